"""Smaller checkpoints: routed experts pruned by importance, Super Experts kept.

`plan_pruning` keeps, in every MoE layer, the same number of routed experts: the Super
Experts given to protect, then the most important others under a criterion of
`superexperts.importance`. `write_pruned` writes the checkpoint with transformers'
``save_pretrained`` (safetensors, in the checkpoint's own tensor layout): each MoE layer's
fused expert tensors and every router tensor over the experts (router weight, bias,
DeepSeek-V3's ``e_score_correction_bias``) keep the rows of the kept experts, in their
original order; the config's expert count is the kept count, and top-k is clamped to it.
Shared experts and dense MLPs are untouched.

What the smaller checkpoint computes, and when it equals the runtime-skip model (the
unpruned model with the pruned experts' outputs dropped, `superexperts.prune_experts`):

- Its router scores only the kept experts and takes its top-k among them. That is exactly
  the unpruned model with the pruned experts' router logits at -inf (softmax families) or
  excluded from the choice (sigmoid families): tokens whose top-k held a pruned expert get
  the next best kept expert instead.
- The runtime-skip model keeps the unpruned router: such tokens run k - j experts with their
  unpruned weights. So the two agree only on tokens whose top-k holds no pruned expert, and
  then only if the family's weights of the chosen k do not depend on the other experts'
  logits: softmax then top-k renormalised over the k (Qwen2/3-MoE and OLMoE with
  ``norm_topk_prob=True``, Mixtral), top-k then softmax (GPT-OSS), sigmoid scores normalised
  over the k (DeepSeek-V3). Without renormalisation (``norm_topk_prob=False``: Qwen2-MoE,
  DeepSeek-V2-Lite) the kept experts' softmax weights grow by the pruned experts' share of
  the partition function, so even those tokens differ.

Group-limited routing (DeepSeek-V3/R1 ``n_group > topk_group``) chooses among groups of
``E / n_group`` experts; pruning unevenly across groups has no such layout, so it is refused.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .ablation import ExpertRef, expert_refs
from .importance import check_criterion, ranking
from .layers import find_layers, text_config
from .result import ProfileResult

PLAN_FILE = "superexperts_pruning.json"
# Config keys that hold the number of routed experts, and the number chosen per token.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


@dataclass
class PrunePlan:
    """Which routed experts each MoE layer keeps (original ids, ascending)."""

    criterion: str
    keep_ratio: float
    num_experts: int
    num_kept: int
    keep: dict[int, list[int]]
    protected: list[ExpertRef]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep"] = {str(k): v for k, v in self.keep.items()}
        d["protected"] = [list(p) for p in self.protected]
        return d


def plan_pruning(result: ProfileResult, *, criterion: str, keep_ratio: float, protect=()) -> PrunePlan:
    """Keep ``round(keep_ratio * E)`` routed experts per MoE layer (at least one): the
    protected ones (``(layer, expert)`` pairs, `SuperExpert`s or report rows; shared experts
    among them are never pruned anyway), then the highest under `criterion`."""
    check_criterion(criterion)
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"--keep-ratio must be in (0, 1], got {keep_ratio}")
    if not result.routed:
        raise ValueError("the profile holds no MoE layer: nothing to prune")
    sizes = {s.rows.numel() for s in result.routed.values()}
    if len(sizes) != 1:
        raise ValueError(f"MoE layers with different expert counts {sorted(sizes)}: one num_experts cannot describe them")
    num_experts = sizes.pop()
    num_kept = max(1, round(keep_ratio * num_experts))
    refs = expert_refs(protect)
    by_layer: dict[int, set[int]] = {}
    for layer, expert in refs:
        if isinstance(expert, int):
            if layer not in result.routed or not 0 <= expert < num_experts:
                raise ValueError(f"protected expert ({layer}, {expert}) is not a routed expert of the profiled model")
            by_layer.setdefault(layer, set()).add(expert)
    keep = {}
    for layer in sorted(result.routed):
        kept = set(by_layer.get(layer, ()))
        if len(kept) > num_kept:
            raise ValueError(
                f"layer {layer} has {len(kept)} protected experts but keeps only {num_kept} of {num_experts}; "
                "raise --keep-ratio"
            )
        for expert, _ in ranking(result.routed[layer], criterion):
            if len(kept) == num_kept:
                break
            kept.add(expert)
        keep[layer] = sorted(kept)
    return PrunePlan(criterion, keep_ratio, num_experts, num_kept, keep, refs)


def pruned_state_dict(model: torch.nn.Module, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """`model`'s state dict with, in each MoE layer, the tensors over the experts (first dim
    ``E``) of the experts module and of the block's router(s) sliced to the kept experts;
    everything else shared with the model. A router is a module of the MoE block, outside the
    experts and shared experts, holding a ``[E, ...]`` matrix of its own."""
    state = model.state_dict()
    names = {m: n for n, m in model.named_modules()}
    num = plan.num_experts
    for p in find_layers(model):
        if not p.is_moe:
            continue
        if p.index not in plan.keep:
            raise ValueError(f"the plan has no entry for MoE layer {p.index}; was it made from this model's profile?")
        if p.adapter is not None:
            raise ValueError(
                f"layer {p.index}: {p.adapter.family}'s experts run outside transformers' ExpertsInterface; prune writes "
                "checkpoints of ExpertsInterface families only"
            )
        if p.num_experts != num:
            raise ValueError(f"layer {p.index} has {p.num_experts} experts, the plan was made for {num}")
        parent, _, _ = p.experts_name.rpartition(".")
        if not parent:
            raise ValueError(f"layer {p.index}: the experts module is not inside an MoE block; cannot find its router")
        block = p.layer.get_submodule(parent)
        shared = [name[len(parent) + 1 :] if parent else name for name, _ in p.shared]
        routers = [
            m for n, m in block.named_modules()
            if m is not p.experts and not any(n == s or n.startswith(s + ".") or n == s + "_gate" for s in shared)
            and any(t.dim() == 2 and t.shape[0] == num for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])
        ]
        if not routers:
            raise ValueError(f"layer {p.index}: no router over the {num} experts found in {names[block]!r}")
        keep = torch.tensor(plan.keep[p.index])
        for module in (p.experts, *routers):
            for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                key = f"{names[module]}.{n}"
                if key in state and t.dim() > 0 and t.shape[0] == num:
                    state[key] = t.detach().index_select(0, keep.to(t.device)).contiguous()
    return state


def pruned_config(config, plan: PrunePlan):
    """A copy of `config` (a transformers config) describing the pruned model."""
    new = copy.deepcopy(config)
    _update_counts(text_config(new), plan, setattr, getattr)
    return new


def _update_counts(cfg, plan: PrunePlan, put, get) -> bool:
    """Set the expert count, clamp top-k and undo trivial group routing on `cfg` (a config
    object or a config.json dict, read with `get` and written with `put`); True if the expert
    count was found."""
    found = False
    for key in EXPERT_COUNT_KEYS:
        if get(cfg, key, None) == plan.num_experts:
            put(cfg, key, plan.num_kept)
            found = True
    for key in TOP_K_KEYS:
        k = get(cfg, key, None)
        if isinstance(k, int) and k > plan.num_kept:
            put(cfg, key, plan.num_kept)
    groups, chosen = get(cfg, "n_group", None) or 1, get(cfg, "topk_group", None) or 1
    if groups > 1:
        if chosen < groups:
            raise ValueError(
                f"group-limited routing (n_group={groups}, topk_group={chosen}) picks experts by groups of "
                f"{plan.num_experts // groups}; pruning experts unevenly across groups cannot keep that layout"
            )
        put(cfg, "n_group", 1)  # every group chosen: the same routing without groups
        put(cfg, "topk_group", 1)
    return found


def _json_get(d, key, default):
    return d.get(key, default)


def _json_put(d, key, value):
    d[key] = value


def write_pruned(
    model: torch.nn.Module, plan: PrunePlan, out_dir: str | Path, *, source_dir: str | Path | None = None
) -> Path:
    """Write the pruned checkpoint to `out_dir` with ``save_pretrained``; returns `out_dir`.

    With `source_dir` (the checkpoint `model` was loaded from), config.json is the source's
    own file with the expert count and top-k updated (so readers of the original format,
    older transformers and vLLM, read it as before), and its tokenizer and other non-weight
    files are copied. `PLAN_FILE` records the kept expert ids per layer.
    """
    out = Path(out_dir)
    state = pruned_state_dict(model, plan)
    config = pruned_config(model.config, plan)
    original = model.config
    model.config = config
    try:
        model.save_pretrained(out, state_dict=state)
    finally:
        model.config = original
    if source_dir is not None:
        src = Path(source_dir)
        data = json.loads((src / "config.json").read_text())
        text = data.get("text_config", data) if isinstance(data.get("text_config"), dict) else data
        if not _update_counts(text, plan, _json_put, _json_get):
            raise ValueError(f"{src / 'config.json'}: no {'/'.join(EXPERT_COUNT_KEYS)} equal to {plan.num_experts}")
        (out / "config.json").write_text(json.dumps(data, indent=2) + "\n")
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
    (out / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return out


def summary(plan: PrunePlan) -> str:
    kept = plan.num_kept * len(plan.keep)
    total = plan.num_experts * len(plan.keep)
    return (
        f"kept {plan.num_kept} of {plan.num_experts} routed experts in each of {len(plan.keep)} MoE layers "
        f"({kept} of {total}, {100 * (1 - kept / total):.1f}% pruned) by {plan.criterion}; "
        f"{sum(isinstance(e, int) for _, e in plan.protected)} protected"
    )


