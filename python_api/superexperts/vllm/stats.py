"""Per-layer routed-expert statistics that live on the device for the whole serving run.

One `LayerStats` per MoE layer holds running values over every profiled token, indexed
by the layer's global expert id ``[E]``:

- out_absmax fp32: max |down_proj output| before the routing weight (-1 before any row);
- out_token int64: the token reference of that maximum (``request_uid * span + position``,
  see `superexperts.vllm.tokens`), out_channel int64: its hidden channel (-1 before any row);
- in_absmax fp32: max |down_proj input|; rows int64: rows profiled.

`record_routed` (``torch.ops.superexperts_vllm.record_routed``) folds one call's
per-expert results into them in place. It is a custom op with ``mutates_args`` and no
host sync, so it runs unchanged in eager mode, under torch.compile and inside CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..collector import DownProjStats

FIELDS = tuple(f.name for f in fields(DownProjStats))


@dataclass
class LayerStats(DownProjStats):
    """The toolkit's `DownProjStats` (same fields, same "nothing seen" values from
    ``LayerStats.empty(num_experts, device)``), updated in place on the device."""

    def reset(self) -> None:
        """Back to "nothing seen", in place (the buffers' addresses never change)."""
        self.out_absmax.fill_(-1.0)
        self.out_token.fill_(-1)
        self.out_channel.fill_(-1)
        self.in_absmax.zero_()
        self.rows.zero_()

    def record(self, out_absmax, out_argmax, in_absmax, rows, expert_ids) -> None:
        """Fold one call's per-expert stats (of the experts `expert_ids` ``[n]`` int64,
        global ids) into the buffers: see `record_routed`."""
        torch.ops.superexperts_vllm.record_routed(
            self.out_absmax, self.out_token, self.out_channel, self.in_absmax, self.rows,
            out_absmax, out_argmax, in_absmax, rows, expert_ids,
        )


@torch.library.custom_op(
    "superexperts_vllm::record_routed",
    mutates_args=("out_absmax", "out_token", "out_channel", "in_absmax", "rows"),
)
def record_routed(
    out_absmax: torch.Tensor,
    out_token: torch.Tensor,
    out_channel: torch.Tensor,
    in_absmax: torch.Tensor,
    rows: torch.Tensor,
    new_absmax: torch.Tensor,
    new_argmax: torch.Tensor,
    new_in_absmax: torch.Tensor,
    new_rows: torch.Tensor,
    expert_ids: torch.Tensor,
) -> None:
    """Running-stat update of the experts `expert_ids` ``[n]`` from one call's
    ``moe_down_proj_profile`` outputs (new_absmax ``[n]``, new_argmax ``[n, 2]`` =
    (token reference, channel), new_in_absmax ``[n]``, new_rows ``[n]``).

    A new maximum replaces the running one when it is strictly larger (the earlier
    token wins ties) or NaN, and only for experts that got rows in this call.
    """
    cur = out_absmax[expert_ids]
    better = ((new_absmax > cur) | (new_absmax.isnan() & ~cur.isnan())) & (new_rows > 0)
    out_absmax.index_copy_(0, expert_ids, torch.where(better, new_absmax, cur))
    out_token.index_copy_(0, expert_ids, torch.where(better, new_argmax[:, 0], out_token[expert_ids]))
    out_channel.index_copy_(0, expert_ids, torch.where(better, new_argmax[:, 1], out_channel[expert_ids]))
    in_absmax.index_copy_(0, expert_ids, torch.maximum(in_absmax[expert_ids], new_in_absmax))
    rows.index_add_(0, expert_ids, new_rows)


@record_routed.register_fake
def _(out_absmax, out_token, out_channel, in_absmax, rows, new_absmax, new_argmax, new_in_absmax, new_rows, expert_ids):
    return None


_layers: dict[int, LayerStats] = {}


def register_layer(layer: int, num_experts: int, device: torch.device | str) -> LayerStats:
    """The buffers of decoder layer `layer` (created on first call)."""
    stats = _layers.get(layer)
    if stats is None:
        stats = _layers[layer] = LayerStats.empty(num_experts, device)
    elif stats.out_absmax.numel() != num_experts:
        raise ValueError(
            f"superexperts.vllm: two MoE layers report decoder layer index {layer} with "
            f"{stats.out_absmax.numel()} and {num_experts} experts"
        )
    return stats


def layers() -> dict[int, LayerStats]:
    """Every registered layer's buffers, by decoder layer index."""
    return dict(sorted(_layers.items()))


def reset_all() -> None:
    for stats in _layers.values():
        stats.reset()
