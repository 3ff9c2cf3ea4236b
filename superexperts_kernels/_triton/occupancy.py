"""How many CTAs of a compiled kernel fit one SM, from its registers and shared memory.

The limits are NVIDIA's per compute capability (CUDA C Programming Guide, "Compute
Capabilities" table): 64K 32-bit registers per SM, allocated per warp in units of 256;
shared memory per SM (228 KB on sm_90, 164 KB on sm_80, 100 KB on sm_86/89), of which
1 KB is reserved per CTA; at most 64 resident warps (48 on sm_86/89) and 32 CTAs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SmLimits:
    registers: int = 65536
    shared_bytes: int = 233472
    max_warps: int = 64
    max_ctas: int = 32
    reserved_shared_per_cta: int = 1024
    register_unit: int = 256


SM_LIMITS = {
    90: SmLimits(shared_bytes=233472),
    80: SmLimits(shared_bytes=167936),
    86: SmLimits(shared_bytes=102400, max_warps=48, max_ctas=16),
    89: SmLimits(shared_bytes=102400, max_warps=48, max_ctas=24),
}


def limits(arch: int) -> SmLimits:
    """Limits of compute capability `arch` (e.g. 90); unknown ones take the nearest lower."""
    known = [a for a in SM_LIMITS if a <= arch] or [min(SM_LIMITS)]
    return SM_LIMITS[max(known)]


def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int, arch: int) -> int:
    """Resident CTAs per SM of a kernel using `registers` per thread, `shared_bytes` of shared
    memory per CTA and `num_warps` warps; 0 when one CTA does not fit."""
    lim = limits(arch)
    per_warp = -(-registers * 32 // lim.register_unit) * lim.register_unit
    by_regs = lim.registers // (per_warp * num_warps) if registers else lim.max_ctas
    by_smem = lim.shared_bytes // (shared_bytes + lim.reserved_shared_per_cta)
    by_warps = lim.max_warps // num_warps
    return max(0, min(by_regs, by_smem, by_warps, lim.max_ctas))
