"""The out-of-tree replacement of vLLM's ``UnquantizedFusedMoEMethod``: the same method,
with its experts class swapped for a profiling one while the plugin is enabled."""

from __future__ import annotations

_registered = False


def profiling_experts_cls(experts_cls):
    """The profiling experts class standing in for vLLM's choice `experts_cls`."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    if issubclass(experts_cls, CPUUnquantizedExperts):
        from .cpu_experts import ProfilingCPUExperts

        return ProfilingCPUExperts
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    if experts_cls is TritonExperts:
        from .cuda_experts import ProfilingTritonExperts

        return ProfilingTritonExperts
    raise ValueError(
        f"superexperts.vllm: vLLM chose the MoE experts class {experts_cls.__name__}, which the profiler "
        "cannot observe; supported: the CPU experts and the Triton experts "
        "(on GPU start vLLM with --moe-backend triton)"
    )


def register_method_class() -> None:
    """Register the replacement with ``CustomOp.register_oot`` (once per process)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    from .plugin import is_enabled

    class ProfilingUnquantizedFusedMoEMethod(UnquantizedFusedMoEMethod):
        def __init__(self, moe):
            super().__init__(moe)
            if is_enabled() and self.experts_cls is not None:
                from .layer_setup import check_parallel

                check_parallel(moe)
                self.experts_cls = profiling_experts_cls(self.experts_cls)

    UnquantizedFusedMoEMethod.register_oot(ProfilingUnquantizedFusedMoEMethod, name=UnquantizedFusedMoEMethod.__name__)
    # Keep vLLM's custom-op name, which its compilation config uses to enable/disable ops.
    ProfilingUnquantizedFusedMoEMethod.name = UnquantizedFusedMoEMethod.name
    _registered = True
