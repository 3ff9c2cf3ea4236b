"""Argument checks shared by the ops.

Every check raises `TypeError` (wrong type or dtype) or `ValueError` (wrong rank,
shape, device or value) with a message that names the argument and says what was
expected, so that bad input never turns into silently wrong statistics.

Who checks what, once per call:

- the public Python wrappers: `ArgumentTypes.check`, the Python type of each argument
  against the op schema (the dispatcher would reject a wrong type with a message that
  does not name the op);
- the op itself (its real implementation, and its fake while tracing): ranks, dtypes,
  devices, sizes and scalar ranges, with the helpers below;
- ``csrc/checks.h`` mirrors these helpers, with the same messages, for direct calls of the
  ``*_native`` ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

# Schema type -> (accepted Python types, what the message calls it).
_SCHEMA_TYPES = {
    "Tensor": ((torch.Tensor,), "a torch.Tensor"),
    "bool": ((bool,), "a bool"),
    "int": ((int,), "an int"),
    "float": ((int, float), "a float"),
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class ArgumentTypes:
    """The Python types the arguments of an op must have, read once from its schema."""

    def __init__(self, op: str, schema: torch._C.FunctionSchema):
        self.op = op
        self.args = []  # (name, accepted types, what they are called, None allowed)
        for arg in schema.arguments:
            kind, optional = arg.type, isinstance(arg.type, torch._C.OptionalType)
            types, what = _SCHEMA_TYPES[str(kind.getElementType() if optional else kind)]
            self.args.append((arg.name, types, what, optional))

    def check(self, values: Sequence[object]) -> None:
        """Check the Python type of each argument in `values` (all of them, in schema order)."""
        for (name, types, what, optional), value in zip(self.args, values, strict=True):
            if value is None and optional:
                continue
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise TypeError(f"{self.op}: `{name}` must be {what}{' or None' if optional else ''}, got {type(value).__name__}")


def check_tensor(
    op: str,
    name: str,
    t: torch.Tensor,
    *,
    ndim: int,
    dtypes: Sequence[torch.dtype],
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that tensor argument `name` of `op` has rank `ndim`, one of `dtypes`, and is on `device`."""
    if t.dim() != ndim:
        raise ValueError(f"{op}: `{name}` must be {ndim}-D, got {t.dim()}-D with shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{op}: `{name}` must have dtype in ({names}), got {dtype_name(t.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but the other inputs are on {device}")
    return t


def check_same_dtype(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{op}: `{name}` has dtype {dtype_name(t.dtype)} but `{ref_name}` has {dtype_name(ref.dtype)}; they must match"
        )


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, expected: int, what: str, *, broadcast: bool = False) -> None:
    """``t.shape[dim] == expected`` (or 1 with `broadcast`), `what` saying where `expected` comes from."""
    size = t.shape[dim]
    if size != expected and not (broadcast and size == 1):
        wanted = f"1 or {expected}" if broadcast else f"{expected}"
        raise ValueError(
            f"{op}: `{name}` has size {size} in dim {dim} (shape {tuple(t.shape)}); expected {wanted} to match {what}"
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
    first, n_decreasing, last = torch.stack([o[0], (o[1:] < o[:-1]).sum(), o[-1]]).tolist()
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
