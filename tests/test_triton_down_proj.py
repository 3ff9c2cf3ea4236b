"""The Triton down_proj kernel itself: tile orders, ties across tiles, configs, host cost.

Run on CPU tensors under the interpreter (or on CUDA when present), on small shapes. The
statistics must equal, bit for bit, those of the written ``y`` whatever the tiling: the
persistent grid, the grouped tile order, the column-quarter channel reduction.
"""

import json

import pytest
import torch
from conftest import KERNEL_DEVICE, requires_triton

import superexperts_kernels as sk

pytestmark = requires_triton

OP = "moe_down_proj_profile"


def tile(bm, bn, bk, group=1):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_warps": 4, "num_stages": 1}


def brute_stats(y, x, counts):
    """Per expert: max |y|, its first (row, channel) in row-major order, max |x|, channel maxima."""
    hidden = y.shape[1]
    out = []
    start = 0
    for n in counts:
        if n:
            a = y[start : start + n].float().abs()
            flat = int(a.argmax())  # first occurrence
            out.append((a.max().item(), [start + flat // hidden, flat % hidden], x[start : start + n].float().abs().max().item(), a.amax(0)))
        else:
            out.append((0.0, [-1, -1], 0.0, torch.zeros(hidden)))
        start += n
    return out


def check_exact(res, x, counts, with_channels=True):
    y = res[0].cpu()
    for e, (absmax, loc, in_max, chan) in enumerate(brute_stats(y, x.cpu(), counts)):
        assert res[1][e].item() == absmax, e
        assert res[2][e].tolist() == loc, e
        assert res[3][e].item() == in_max, e
        assert res[4][e].item() == counts[e], e
        if with_channels:
            assert torch.equal(res[5][e].cpu(), chan), e


@pytest.mark.parametrize("cfg", [tile(16, 32, 32), tile(16, 32, 16, group=3), tile(32, 128, 32, group=2)],
                         ids=["16x32x32", "16x32x16-group3", "32x128x32-group2-quarters"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_ties_across_tiles_locate_the_first_occurrence(cfg, dtype):
    """The max of expert 1 appears in several row tiles and column tiles: the first in
    row-major order wins, whichever program merges first."""
    from superexperts_kernels._triton.down_proj import moe_down_proj_profile_triton

    counts, hidden, inter = [3, 41, 0, 7], 136, 48
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(sum(counts) + 2, inter, generator=g) * 0.1).to(dtype)
    w = (torch.randn(len(counts), hidden, inter, generator=g) * 0.1).to(dtype)
    x[3 + 5, :] = 0
    x[3 + 5, 0] = 4.0
    x[3 + 37, :] = 0
    x[3 + 37, 0] = -4.0  # same |y| in a later row tile
    w[1, :, 0] = 0
    for c in (17, 100, 130):  # three column tiles hold the max in both rows
        w[1, c, 0] = 2.0
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    res = moe_down_proj_profile_triton(x.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE), offsets.to(KERNEL_DEVICE), None,
                                       None, False, True, config=cfg)
    assert res[2][1].tolist() == [3 + 5, 17]
    check_exact(res, x, counts)
    assert torch.all(res[0][sum(counts):].cpu() == 0)


def test_bias_on_rows_past_the_expert_is_not_a_stat():
    """Rows of a tile past its expert's end hold only the bias in registers; they must not
    count, even when the bias is larger than every real output."""
    from superexperts_kernels._triton.down_proj import moe_down_proj_profile_triton

    counts, hidden, inter = [2, 3], 40, 16
    x = torch.full((5, inter), 0.01)
    w = torch.full((2, hidden, inter), 0.01)
    bias = torch.zeros(2, hidden)
    bias[0, 7] = 100.0  # y rows of expert 0 see it too, so it is a real max there
    bias[1, 9] = -50.0
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    dev = KERNEL_DEVICE
    res = moe_down_proj_profile_triton(x.to(dev), w.to(dev), offsets.to(dev), bias.to(dev), None, False, True,
                                       config=tile(16, 32, 16))
    check_exact(res, x, counts)
    assert res[1].tolist() == pytest.approx([100.0016, 49.9984], abs=1e-3)


def test_stats_off_is_the_same_y_and_positional_with_stats():
    from superexperts_kernels._triton.down_proj import moe_down_proj_profile_triton

    counts = [4, 0, 9]
    x = torch.randn(13, 24).to(KERNEL_DEVICE)
    w = torch.randn(3, 16, 24).to(KERNEL_DEVICE)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32).to(KERNEL_DEVICE)
    on = moe_down_proj_profile_triton(x, w, offsets, None, None, False, True, True)
    off = moe_down_proj_profile_triton(x, w, offsets, None, None, False, True, False)
    assert torch.equal(on[0], off[0])
    assert torch.all(off[1] == 0) and torch.all(off[2] == -1) and torch.all(off[3] == 0) and torch.all(off[5] == 0)
    assert off[4].tolist() == counts
    check_exact(on, x, counts)


# --------------------------------------------------------------------------- configs


def test_device_files_are_read_by_family_and_exact_name(tmp_path, monkeypatch):
    from superexperts_kernels._triton import down_proj as tk

    shipped = tk.config_for_device("NVIDIA H100 80GB HBM3", 32768, 128, 2048, 768, torch.bfloat16)
    assert (shipped["BLOCK_M"], shipped["BLOCK_N"], shipped["BLOCK_K"]) == (128, 256, 64)
    a100 = tk.config_for_device("NVIDIA A100-SXM4-80GB", 32768, 128, 2048, 768, torch.float16)
    assert (a100["BLOCK_M"], a100["BLOCK_N"]) == (128, 128)

    monkeypatch.setattr(tk, "_CONFIG_DIR", tmp_path)
    tk.load_device_configs.cache_clear()
    try:
        small, large, family = tile(16, 64, 64), tile(128, 256, 64, 8), tile(64, 128, 64)
        key = tk.shape_key(128, 2048, 768, torch.bfloat16)
        (tmp_path / "H100.json").write_text(json.dumps({"default": [[None, family]], "shapes": {}}))
        exact = tmp_path / tk.device_file_name("NVIDIA H100 80GB HBM3")
        exact.write_text(json.dumps({"shapes": {key: {"8": small, "32768": large}}}))
        assert exact.name == "NVIDIA_H100_80GB_HBM3.json"
        assert tk.config_for_device("NVIDIA H100 80GB HBM3", 100, 128, 2048, 768, torch.bfloat16) == small
        assert tk.config_for_device("NVIDIA H100 80GB HBM3", 20000, 128, 2048, 768, torch.float16) == large
        # Another H100 model: the family file, its default table.
        assert tk.config_for_device("NVIDIA H100 PCIe", 20000, 128, 2048, 768, torch.bfloat16) == family
        # No file at all, or fp32: the built-in tables.
        fallback = tk.config_for_device("NVIDIA L4", 20000, 128, 2048, 768, torch.bfloat16)
        assert fallback == tk._FALLBACK_16BIT[-1][1]
        assert tk.config_for_device("NVIDIA H100 80GB HBM3", 20000, 128, 2048, 768, torch.float32) == tk._FALLBACK_FP32[-1][1]
    finally:
        tk.load_device_configs.cache_clear()


# --------------------------------------------------------------------------- host cost


def _top_level_aten_ops(fn) -> list[str]:
    """Names of the aten ops `fn()` calls, not counting ops inside other aten ops, nor inside
    a kernel launch (under the interpreter a launch copies tensors)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    out = []
    for ev in prof.events():
        parents, p = [], ev.cpu_parent
        while p is not None:
            parents.append(p.name)
            p = p.cpu_parent
        if ev.name.startswith("aten::") and not any(n.startswith("aten::") or n == "kernel_launch" for n in parents):
            out.append(ev.name)
    return out


class _Counted:
    """A Triton kernel whose launches are counted and marked for the profiler."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(grid)
            with torch.profiler.record_function("kernel_launch"):
                return self.kernel[grid](*args, **kwargs)

        return launch


def test_one_call_runs_few_aten_ops(monkeypatch):
    """The launcher allocates its outputs and launches two kernels; it reads no device value."""
    from superexperts_kernels._triton import down_proj as tk

    launches = []
    monkeypatch.setattr(tk, "_moe_down_proj_kernel", _Counted(tk._moe_down_proj_kernel, launches))
    monkeypatch.setattr(tk, "_finalize_kernel", _Counted(tk._finalize_kernel, launches))
    counts = [5, 0, 11, 2]
    dev = KERNEL_DEVICE
    x = torch.randn(sum(counts), 32, device=dev)
    w = torch.randn(4, 24, 32, device=dev)
    offsets = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
    with sk.use_backend(OP, torch.device(dev).type, "triton"):
        launcher = _top_level_aten_ops(lambda: tk.moe_down_proj_profile_triton(x, w, offsets, None, None, False, True))
        public = _top_level_aten_ops(lambda: sk.moe_down_proj_profile(x, w, offsets, channel_stats=True))
    assert len(launches) == 4
    assert "aten::item" not in launcher and "aten::_local_scalar_dense" not in launcher, launcher
    assert len(launcher) <= 10, launcher
    # The public op adds its argument checks (at most one host sync, for the offsets values).
    assert len(public) <= len(launcher) + 12, public
