"""superexperts: find and measure Super Experts in Mixture-of-Experts LLMs.

The user-facing toolkit on top of the ops in `superexperts_kernels`:

- `profile(model, tokens)`: per-expert down_proj output maxima (and where), shared
  experts and dense MLPs, massive activations and attention-sink mass, in one pass,
  through transformers' ExpertsInterface / AttentionInterface, or a declared adapter for
  the families whose experts bypass it (`superexperts families` lists every MoE family);
- `ProfileResult.super_experts(Rule(...))`: the paper's rule and others;
- `prune_experts`, `prune_super_experts`, `evaluate`, `ablate`, `sink_decay`: ablations;
- `write_report`: JSON, the authors' report format, raw stats and plots.
"""

from .ablation import AblationResult, Evaluation, Pruning, ablate, evaluate, prune_experts, prune_super_experts, sink_decay
from .integration import register
from .profiler import profile
from .report import write_report
from .result import ProfileResult
from .rules import Rule, SuperExpert, detect

__all__ = [
    "AblationResult",
    "Evaluation",
    "ProfileResult",
    "Pruning",
    "Rule",
    "SuperExpert",
    "ablate",
    "detect",
    "evaluate",
    "profile",
    "prune_experts",
    "prune_super_experts",
    "register",
    "sink_decay",
    "write_report",
]

__version__ = "0.1.0"
