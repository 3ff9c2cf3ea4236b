"""Routed experts on our op: ``experts_implementation="superexperts"`` for transformers'
fused experts, and the same path for the families declared in `superexperts.adapters`.

One grouped path (`grouped_rows`) serves both. It mirrors transformers' ``grouped_mm``
implementation: rows sorted by expert, one grouped GEMM per up weight (``gate_up_proj``,
or gate and up), the model's own gate/activation, one grouped GEMM for ``down_proj``. The
GEMMs run through ``torch.ops.superexperts.moe_down_proj_profile``, the up ones without
statistics; the down projection's per-expert statistics (max |output| before the routing
weight and the token/channel where it happened, max |input|, rows) go to the active
collector, with the importance sums of `superexperts.importance` when the caller gives the
rows' routing weights g (the op sums ``g * ||y||_2`` as ``row_weight``; the weights and each
token's top-1 row are counted here). Families whose routing weight scales the expert's input
(Llama 4, ``expert_major``) give none: they record rows only. The offsets are a cumulative sum of row counts, valid by construction, so the op
is told not to read them back (no host sync per call).

Slots of routing weight 0 (LongCat-Flash's identity experts, sent to real experts with weight 0)
are not computed and not counted.

The module's `superexperts.layers.ModuleTag` carries the rest:

- ``pruned`` (bool ``[E]``): experts skipped when routed; their rows are sent past
  ``offsets[-1]`` like expert-parallel sentinels, so they cost no GEMM and contribute zero.
  Nothing in the weights changes.
- ``shard`` (`superexperts.distributed.ExpertShard`, expert parallel, ExpertsInterface
  only): the module holds experts ``start .. start + num_experts`` of ``num_global``; rows of
  the other experts are sentinels here, and one ``all_reduce`` of the ``[T * k, H]``
  weighted rows completes them before the top-k sum.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.integrations.moe import ExpertsInterface

from superexperts_kernels import moe_down_proj_profile

from . import collector as _collector
from .adapters import Adapter
from .layers import tag_of

NAME = "superexperts"


def _grouped_linear(x, weight, offsets, bias, transposed, row_token=None, *, with_stats=True, row_weight=None):
    return moe_down_proj_profile(
        x.to(weight.dtype), weight, offsets, bias, row_token, w_transposed=transposed, with_stats=with_stats,
        check_offsets=False, row_weight=row_weight,
    )


@dataclass(frozen=True)
class ExpertsMath:
    """What the grouped path needs of an experts module.

    up: ``(weight [E, N, K] ([E, K, N] when up_transposed), bias [E, N] or None)`` per up
    GEMM; activation: their outputs ``[S, N]`` -> the down input ``[S, I]``; down:
    ``[E, H, I]`` (``[E, I, H]`` when down_transposed); post: applied to the down output
    (post-expert norms) or None.
    """

    num_experts: int
    up: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]
    up_transposed: bool
    activation: Callable[..., torch.Tensor]
    down: torch.Tensor
    down_bias: torch.Tensor | None
    down_transposed: bool
    post: Callable[[torch.Tensor], torch.Tensor] | None = None


def interface_math(module: torch.nn.Module) -> ExpertsMath:
    """The math of an experts module decorated by transformers' ``@use_experts_implementation``."""
    bias = module.has_bias
    if module.has_gate:
        up = (module.gate_up_proj, getattr(module, "gate_up_proj_bias", None) if bias else None)
        activation = module._apply_gate
    else:
        up = (module.up_proj, getattr(module, "up_proj_bias", None) if bias else None)
        activation = module.act_fn
    return ExpertsMath(
        num_experts=module.num_experts,
        up=(up,),
        up_transposed=module.is_transposed,
        activation=activation,
        down=module.down_proj,
        down_bias=getattr(module, "down_proj_bias", None) if bias else None,
        down_transposed=module.is_transposed,
        post=module.post_expert_norm if getattr(module, "has_post_expert_norm", False) else None,
    )


def _act_times_up(act: Callable, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return act(gate) * up


def adapter_math(adapter: Adapter, module: torch.nn.Module) -> ExpertsMath:
    """The math of an experts module declared by `adapter`."""
    n = adapter.num_experts(module)
    if adapter.gate is not None:
        activation = getattr(module, adapter.gate)
    else:
        activation = functools.partial(_act_times_up, operator.attrgetter(adapter.activation)(module))
    return ExpertsMath(
        num_experts=n,
        up=tuple((w.get(module, n), None) for w in adapter.up),
        up_transposed=adapter.up[0].transposed,
        activation=activation,
        down=adapter.down.get(module, n),
        down_bias=None,
        down_transposed=adapter.down.transposed,
    )


def grouped_rows(
    module: torch.nn.Module,
    math: ExpertsMath,
    source: torch.Tensor,
    row_source: torch.Tensor,
    row_expert: torch.Tensor,
    row_token: torch.Tensor,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The down_proj output ``[R, H]`` of every row: row r is ``source[row_source[r]]`` through
    expert ``row_expert[r]``; rows whose expert is ``>= num_experts`` (sentinels, pruned) are
    not computed and give zeros. ``row_token [R]``: each row's token in the batch (for the
    statistics' locations). ``row_weight [R]``: the routing weight the caller multiplies each
    row's output by, for the importance sums (None: not recorded). The down projection's
    statistics go to the active collector under the module's layer."""
    num_experts = math.num_experts
    device = source.device
    sorted_ids, perm = torch.sort(row_expert, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.index_add_(0, sorted_ids, torch.ones_like(sorted_ids))
    offsets = torch.cumsum(counts[:num_experts], 0).to(torch.int32)
    x = source[row_source[perm]]

    ups = [_grouped_linear(x, w, offsets, b, math.up_transposed, with_stats=False).y for w, b in math.up]
    act = math.activation(*ups)

    tag = tag_of(module)
    stats = _collector.active()
    layer = tag.layer if tag is not None else None
    shard = tag.shard if tag is not None else None
    tokens = row_token[perm] + (stats.token_offset if stats is not None else 0)
    recording = stats is not None and layer is not None
    weight = row_weight.reshape(-1)[perm].float() if recording and row_weight is not None else None
    prof = _grouped_linear(act, math.down, offsets, math.down_bias, math.down_transposed, tokens, row_weight=weight)
    if recording:
        first, num_global = (shard.start, shard.num_global) if shard is not None else (0, num_experts)
        per_expert = _per_expert_stats(prof, sorted_ids, perm, row_token, row_weight, num_experts)
        stats.record_grouped(layer, **_in_global_ids(per_expert, first, num_global))

    y = prof.y if math.post is None else math.post(prof.y)
    y = torch.where((sorted_ids < num_experts).unsqueeze(-1), y, 0)
    out = torch.empty_like(y)
    out[perm] = y
    return out


def expert_ids(module: torch.nn.Module, top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T * k]`` local expert id of each (token, slot) row, ``num_experts`` for rows this
    process does not compute: ids outside its experts (EP sentinels, other ranks' experts)
    and pruned experts."""
    tag = tag_of(module)
    shard = tag.shard if tag is not None else None
    first, num_global = (shard.start, shard.num_global) if shard is not None else (0, num_experts)
    ids = top_k_index.reshape(-1)
    held = (ids >= first) & (ids < first + num_experts)
    pruned = tag.pruned if tag is not None else None
    if pruned is not None:
        held &= ~pruned.to(ids.device)[ids.clamp(0, num_global - 1)]
    return torch.where(held, ids - first, num_experts)


def _weighted_rows(y: torch.Tensor, ids: torch.Tensor, num_experts: int, top_k_weights: torch.Tensor) -> torch.Tensor:
    """``[T * k, H]``: each computed row times its routing weight, zeros for the others."""
    weights = top_k_weights.reshape(-1, 1)
    return torch.where((ids < num_experts).unsqueeze(-1), y * weights, 0)


def superexperts_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """ExpertsInterface function: hidden_states ``[T, H]``, top_k_index / top_k_weights
    ``[T, k]`` -> ``[T, H]`` in hidden_states.dtype."""
    num_tokens, hidden_dim = hidden_states.shape
    num_top_k = top_k_index.shape[-1]
    num_experts = self.num_experts  # held by this process
    ids = expert_ids(self, top_k_index, num_experts)
    # A slot of routing weight 0 adds nothing to the output and is not routed: LongCat-Flash sends
    # its identity ("zero-computation") experts' slots to real experts with weight 0.
    ids = torch.where(top_k_weights.reshape(-1) == 0, num_experts, ids)
    token_of_row = torch.arange(ids.numel(), device=ids.device) // num_top_k
    y = grouped_rows(self, interface_math(self), hidden_states, token_of_row, ids, token_of_row, top_k_weights)
    weighted = _weighted_rows(y, ids, num_experts, top_k_weights)
    tag = tag_of(self)
    if tag is not None and tag.shard is not None:
        torch.distributed.all_reduce(weighted, group=tag.shard.group)
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _per_expert_stats(prof, sorted_ids, perm, row_token, row_weight, num_experts: int) -> dict[str, torch.Tensor]:
    """The op's per-expert stats ``[E]`` and the call's importance sums: the routing weights
    of each expert's rows, and the tokens whose top-1 row (largest routing weight, the first
    of equal ones) went to each expert; zeros without `row_weight`. Rows of id `num_experts`
    (not computed here) count nowhere."""
    weight_sum = torch.zeros(num_experts + 1, device=sorted_ids.device)
    top1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=sorted_ids.device)
    if row_weight is not None:
        w = row_weight.reshape(-1).float()
        weight_sum.index_add_(0, sorted_ids, w[perm])
        top1.index_add_(0, sorted_ids, _top1_rows(row_token, w)[perm].long())
    return dict(
        out_absmax=prof.out_absmax, out_argmax=prof.out_argmax, in_absmax=prof.in_absmax, rows=prof.rows,
        norm_sum=prof.norm_sum, weight_sum=weight_sum[:num_experts], top1=top1[:num_experts],
    )


def _top1_rows(row_token: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """bool ``[R]``: the row of each token with the largest weight (the first of equal ones)."""
    num_rows = weight.numel()
    index = torch.arange(num_rows, device=weight.device)
    best = torch.full((num_rows,), float("-inf"), device=weight.device).scatter_reduce(0, row_token, weight, "amax")
    first = torch.full((num_rows,), num_rows, device=weight.device).scatter_reduce(
        0, row_token, torch.where(weight == best[row_token], index, num_rows), "amin"
    )
    return index == first[row_token]


def _in_global_ids(stats: dict[str, torch.Tensor], first: int, num_global: int) -> dict[str, torch.Tensor]:
    """Per-expert stats ``[E_held, ...]`` of this process's experts, placed at their global ids
    (the others: -1 locations, zeros)."""
    held = next(iter(stats.values())).shape[0]
    if first == 0 and held == num_global:
        return stats
    placed = {}
    for name, t in stats.items():
        g = t.new_full((num_global, *t.shape[1:]), -1 if name == "out_argmax" else 0)
        g[first : first + held] = t
        placed[name] = g
    return placed


# ----------------------------------------------------------------------------- adapters


def _check_adapter_call(adapter: Adapter, module: torch.nn.Module) -> None:
    tag = tag_of(module)
    if tag is not None and tag.shard is not None:
        raise ValueError(
            f"expert parallel is not supported for {adapter.family} ({adapter.experts_class} runs outside "
            "transformers' ExpertsInterface): use --parallel data"
        )


def _top_k_forward(adapter: Adapter, module, hidden_states, top_k_index, top_k_weights):
    """``"top_k"``: hidden ``[..., H]``, top_k_index / top_k_weights ``[T, k]`` -> ``[..., H]``."""
    _check_adapter_call(adapter, module)
    math = adapter_math(adapter, module)
    h = hidden_states.reshape(-1, hidden_states.shape[-1])
    num_tokens, num_top_k = top_k_index.shape
    ids = expert_ids(module, top_k_index, math.num_experts)
    token_of_row = torch.arange(ids.numel(), device=ids.device) // num_top_k
    y = grouped_rows(module, math, h, token_of_row, ids, token_of_row, top_k_weights)
    out = _weighted_rows(y, ids, math.num_experts, top_k_weights).view(num_tokens, num_top_k, -1).sum(dim=1)
    if adapter.identity_experts is not None:
        total = int(operator.attrgetter(adapter.identity_experts)(module))
        identity = (top_k_index >= math.num_experts) & (top_k_index < total)
        out = out + torch.where(identity, top_k_weights, 0).sum(dim=-1, keepdim=True) * h
    return out.to(hidden_states.dtype).reshape(hidden_states.shape)


def _expert_major_forward(adapter: Adapter, module, routed_in):
    """``"expert_major"``: ``x [E * T, H]`` (row ``e * T + t``: token t scaled by its score for
    expert e) -> ``[E * T, H]``, the expert outputs of the routed rows and zeros elsewhere."""
    _check_adapter_call(adapter, module)
    math = adapter_math(adapter, module)
    tag = tag_of(module)
    top_k_index = tag.routing if tag is not None else None
    if tag is not None:
        tag.routing = None
    num_experts = math.num_experts
    if top_k_index is None or top_k_index.shape[0] * num_experts != routed_in.shape[0]:
        raise RuntimeError(
            f"{adapter.experts_class} ran without the routing of its router ({adapter.router}) for these "
            f"{routed_in.shape[0]} rows: the adapter reads it from the router's forward hook"
        )
    num_tokens, num_top_k = top_k_index.shape
    ids = expert_ids(module, top_k_index, num_experts)
    token_of_row = torch.arange(ids.numel(), device=ids.device) // num_top_k
    row_source = top_k_index.reshape(-1) * num_tokens + token_of_row
    y = grouped_rows(module, math, routed_in, row_source, ids, token_of_row)
    out = routed_in.new_zeros(routed_in.shape)
    out[row_source] = y.to(out.dtype)
    return out


def _sorted_rows_forward(adapter: Adapter, module, layer_input):
    """``"sorted_rows"``: the MoE block ``x [B, T, H] -> [B, T, H]`` on its own router's rows."""
    _check_adapter_call(adapter, module)
    math = adapter_math(adapter, module)
    x = layer_input.reshape(-1, layer_input.shape[-1])
    router = operator.attrgetter(adapter.router)(module)
    _, row_token, row_gate, rows_per_expert, _ = router(x)
    counts = torch.as_tensor(rows_per_expert, device=x.device)
    row_expert = torch.repeat_interleave(torch.arange(math.num_experts, device=x.device), counts)
    ids = expert_ids(module, row_expert, math.num_experts)
    y = grouped_rows(module, math, x, row_token, ids, row_token, row_gate)
    weighted = _weighted_rows(y, ids, math.num_experts, row_gate)
    out = torch.zeros_like(x, dtype=weighted.dtype).index_add(0, row_token, weighted).to(x.dtype)
    out = out.view(layer_input.shape)
    if adapter.output_bias is not None:
        out = out + operator.attrgetter(adapter.output_bias)(module)
    return out


ADAPTER_FORWARDS = {"top_k": _top_k_forward, "expert_major": _expert_major_forward, "sorted_rows": _sorted_rows_forward}


def adapter_forward(adapter: Adapter, module: torch.nn.Module) -> Callable:
    """The forward that replaces `module`'s while the toolkit runs it."""
    return functools.partial(ADAPTER_FORWARDS[adapter.call], adapter, module)


def adapter_routing(adapter: Adapter, router: torch.nn.Module, output) -> torch.Tensor:
    """``top_k_index [T, k]`` of an ``"expert_major"`` router's output ``(scores [T, E], logits [T, E])``:
    the top-k of its logits, as the router takes them."""
    return torch.topk(output[1], router.top_k, dim=1).indices


def register() -> None:
    """Make ``experts_implementation="superexperts"`` available to every transformers model."""
    ExpertsInterface.register(NAME, superexperts_experts_forward)
