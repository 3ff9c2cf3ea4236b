"""``torch.ops.superexperts.fused_moe_cpu_native``: a whole MoE layer on the CPU in one op.

Both grouped GEMMs, the gated activation, the routing weights and the top-k sum, with the
down projection's per-expert statistics (as `moe_down_proj_profile` reports them) taken
on the way, from weights packed once with `pack_weights`. Native only (csrc/fused_moe_cpu.cpp);
`fused_moe_cpu_reference` is its pure-torch oracle. Used by ``superexperts.vllm`` to run
vLLM's MoE layers with statistics at vLLM's speed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import native

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_ACT_FN = {0: F.silu, 1: F.gelu, 2: lambda t: F.gelu(t, approximate="tanh")}
_NAME = "superexperts::fused_moe_cpu_native"


class FusedMoE(NamedTuple):
    """out ``[M, H]`` in x.dtype; out_absmax ``[E]`` fp32 (-1 without rows); out_argmax ``[E, 2]``
    int64 (row_ref of the row holding the max, channel; -1 without rows); in_absmax ``[E]``
    fp32 (max |activation|); rows ``[E]`` int64."""

    out: torch.Tensor
    out_absmax: torch.Tensor
    out_argmax: torch.Tensor
    in_absmax: torch.Tensor
    rows: torch.Tensor


def available() -> bool:
    """True when the native extension with this op is built."""
    return native.info()["built"] and hasattr(torch.ops.superexperts, "fused_moe_cpu_native")


def supports(hidden: int, intermediate: int, dtype: torch.dtype) -> bool:
    return available() and hidden % 16 == 0 and intermediate % 8 == 0 and dtype in (torch.float32, torch.float16, torch.bfloat16)


def pack_weights(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 ``[E, 2I, H]`` ([gate; up] rows) and w2 ``[E, H, I]`` -> w13p ``[E, I/8, H, 16]``
    (gate then up columns of 8 features per panel) and w2p ``[E, H/16, I, 16]``."""
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    if two_i % 16 or hidden % 16 or tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(
            f"pack_weights: need w13 [E, 2I, H] and w2 [E, H, I] with I % 8 == 0 and H % 16 == 0, got "
            f"{tuple(w13.shape)} and {tuple(w2.shape)}"
        )
    gate = w13[:, :inter].reshape(num_experts, inter // 8, 8, hidden)
    up = w13[:, inter:].reshape(num_experts, inter // 8, 8, hidden)
    w13p = torch.cat([gate, up], dim=2).transpose(2, 3).contiguous()
    w2p = w2.reshape(num_experts, hidden // 16, 16, inter).transpose(2, 3).contiguous()
    return w13p, w2p


def unpack_weights(w13p: torch.Tensor, w2p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_weights`."""
    num_experts, panels, hidden, _ = w13p.shape
    both = w13p.transpose(2, 3)  # [E, I/8, 16, H]
    w13 = torch.cat([both[:, :, :8].reshape(num_experts, panels * 8, hidden),
                     both[:, :, 8:].reshape(num_experts, panels * 8, hidden)], dim=1)
    w2 = w2p.transpose(2, 3).reshape(num_experts, hidden, panels * 8)
    return w13, w2


def fused_moe_cpu(x, w13p, w2p, topk_weights, topk_ids, row_ref, activation: str = "silu",
                  weights_on_input: bool = False) -> FusedMoE:
    """One MoE layer: x ``[M, H]``; packed weights (`pack_weights`) in x.dtype; topk_weights
    ``[M, k]``; topk_ids ``[M, k]`` local expert ids, -1 to skip a row; row_ref ``[M]`` int64
    token references; `weights_on_input`: the routing weights were applied to x already."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_moe_cpu: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return FusedMoE(*torch.ops.superexperts.fused_moe_cpu_native(
        x, w13p, w2p, topk_weights, topk_ids, row_ref, ACTIVATIONS[activation], weights_on_input))


def fused_moe_cpu_reference(x, w13p, w2p, topk_weights, topk_ids, row_ref, activation: str = "silu",
                            weights_on_input: bool = False) -> FusedMoE:
    """The oracle: per expert, in fp32 with every intermediate the unfused model rounds to
    x.dtype rounded the same way (GEMM outputs, act(gate), act(gate) * up, down rows)."""
    w13, w2 = unpack_weights(w13p, w2p)
    act_fn = _ACT_FN[ACTIVATIONS[activation]]
    num_tokens, top_k = topk_ids.shape
    num_experts, inter = w13.shape[0], w2.shape[2]

    def rnd(t):
        return t.to(x.dtype).float()

    weighted = torch.zeros(num_tokens * top_k, x.shape[1])
    out_absmax = torch.full((num_experts,), -1.0)
    out_argmax = torch.full((num_experts, 2), -1, dtype=torch.int64)
    in_absmax = torch.zeros(num_experts)
    rows = torch.zeros(num_experts, dtype=torch.int64)
    flat_ids = topk_ids.reshape(-1).long()
    for e in range(num_experts):
        slots = torch.nonzero(flat_ids == e).flatten()  # token order
        rows[e] = slots.numel()
        if slots.numel() == 0:
            continue
        up = rnd(x[slots // top_k].float() @ w13[e].float().T)
        act = rnd(rnd(act_fn(up[:, :inter])) * up[:, inter:])
        y = rnd(act @ w2[e].float().T)
        a = y.abs()
        flat = int(torch.argmax(a.view(-1)))
        out_absmax[e] = a.view(-1)[flat]
        out_argmax[e, 0] = row_ref[slots[flat // a.shape[1]] // top_k]
        out_argmax[e, 1] = flat % a.shape[1]
        in_absmax[e] = act.abs().max()
        w = 1.0 if weights_on_input else topk_weights.reshape(-1)[slots].float().unsqueeze(-1)
        weighted[slots] = y * w
    out = weighted.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)
    return FusedMoE(out, out_absmax, out_argmax, in_absmax, rows)


if available():

    @torch.library.register_fake(_NAME)
    def _(x, w13p, w2p, topk_weights, topk_ids, row_ref, activation=0, weights_on_input=False):
        num_experts = w13p.shape[0]
        f32 = dict(dtype=torch.float32, device=x.device)
        return (torch.empty_like(x), torch.empty(num_experts, **f32),
                torch.empty(num_experts, 2, dtype=torch.int64, device=x.device), torch.empty(num_experts, **f32),
                torch.empty(num_experts, dtype=torch.int64, device=x.device))
