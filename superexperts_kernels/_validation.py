"""Argument checks shared by the ops.

Every check raises `TypeError` (wrong type or dtype) or `ValueError` (wrong rank,
shape, device or value) with a message that names the argument and says what was
expected, so that bad input never turns into silently wrong statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: int,
    dtypes: Sequence[torch.dtype],
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that argument `name` of `op` is a tensor of rank `ndim`, one of `dtypes`, on `device`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(
            f"{op}: `{name}` must be {ndim}-D, got {t.dim()}-D with shape {tuple(t.shape)}"
        )
    if t.dtype not in dtypes:
        raise TypeError(
            f"{op}: `{name}` must have dtype in ({_dtype_names(dtypes)}), got {str(t.dtype).replace('torch.', '')}"
        )
    if device is not None and t.device != device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but the other inputs are on {device}")
    return t


def check_same_dtype(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{op}: `{name}` has dtype {str(t.dtype).replace('torch.', '')} but `{ref_name}` has "
            f"{str(ref.dtype).replace('torch.', '')}; they must match"
        )


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{op}: `{name}` has size {t.shape[dim]} in dim {dim} (shape {tuple(t.shape)}); "
            f"expected {expected} to match {what}"
        )


def values_checkable(t: torch.Tensor) -> bool:
    """True when a check that reads tensor values (one host sync) is allowed here.

    Value checks are skipped while tracing (`torch.compile`, fake tensors) and while a
    CUDA graph is being captured, where reading a device value is impossible.
    """
    if torch.compiler.is_compiling():
        return False
    if isinstance(t, torch._subclasses.fake_tensor.FakeTensor) or t.device.type == "meta":
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_offsets_values(op: str, offsets: torch.Tensor, num_rows: int) -> None:
    """`offsets` must be non-negative, non-decreasing and end at most at `num_rows` (one sync)."""
    if offsets.numel() == 0 or not values_checkable(offsets):
        return
    o = offsets.to(torch.int64)
    first, n_decreasing, last = torch.stack(
        [o[0], (o[1:] < o[:-1]).sum(), o[-1]]
    ).tolist()
    if first < 0:
        raise ValueError(f"{op}: `offsets` must be non-negative, got offsets[0] = {first}")
    if n_decreasing:
        i = int(torch.nonzero(o[1:] < o[:-1])[0, 0]) + 1
        raise ValueError(
            f"{op}: `offsets` must be non-decreasing cumulative row ends, but offsets[{i}] = {int(o[i])} "
            f"< offsets[{i - 1}] = {int(o[i - 1])}"
        )
    if last > num_rows:
        raise ValueError(
            f"{op}: `offsets` ends at {last} but `x` has only {num_rows} rows; offsets[-1] must be <= {num_rows}"
        )
