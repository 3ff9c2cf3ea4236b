"""Run moe_down_proj_profile on one random MoE layer and print the per-expert table.

    python examples/profile_random_layer.py [--experts 16 --hidden 256 --inter 128 --tokens 512 --top-k 2]

One expert gets a planted outlier in its down_proj so that the table shows what a
Super Expert looks like next to ordinary ones.
"""

import argparse

import torch

import superexperts_kernels as sk


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=128)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E, H, I = args.experts, args.hidden, args.inter
    hidden_states = torch.randn(args.tokens, H)
    router = torch.randn(H, E) / H**0.5
    gate_up = torch.randn(E, 2 * I, H) / H**0.5
    down = torch.randn(E, H, I) / I**0.5
    planted = E // 3
    down[planted, 7] *= 200.0  # one channel of one expert carries a massive activation

    # Route, sort rows by expert, and run the gated MLP up to the down projection.
    top_k = (hidden_states @ router).topk(args.top_k, dim=-1).indices
    expert_ids = top_k.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    token_of_row = (torch.arange(args.tokens).repeat_interleave(args.top_k))[order]
    counts = torch.bincount(expert_ids, minlength=E)
    x = hidden_states[token_of_row]
    act = torch.empty(x.shape[0], I)
    start = 0
    for e, n in enumerate(counts.tolist()):
        g, u = (x[start : start + n] @ gate_up[e].T).chunk(2, dim=-1)
        act[start : start + n] = torch.nn.functional.silu(g) * u
        start += n

    out = sk.moe_down_proj_profile(
        act.to(device, dtype),
        down.to(device, dtype),
        torch.cumsum(counts, 0).to(device, torch.int32),
        row_token=token_of_row.to(device),
    )
    print(f"device={device} dtype={str(dtype).replace('torch.', '')} backend={sk.backends()['moe_down_proj_profile'][device]}")
    print(f"{'expert':>6} {'rows':>5} {'max|out|':>10} {'token':>6} {'channel':>7} {'max|in|':>8}")
    for e in range(E):
        tok, ch = out.out_argmax[e].tolist()
        mark = "  <- planted" if e == planted else ""
        print(
            f"{e:>6} {int(out.rows[e]):>5} {out.out_absmax[e].item():>10.2f} {tok:>6} {ch:>7} "
            f"{out.in_absmax[e].item():>8.2f}{mark}"
        )


if __name__ == "__main__":
    main()
