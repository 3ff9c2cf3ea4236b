// Argument checks of the native ops, for direct calls of torch.ops.superexperts.*_native (the
// public ops check in Python before they dispatch here). They mirror
// superexperts_kernels/_validation.py helper for helper and give the same messages after the
// op name (tests/test_native.py compares them): ValueError for rank, shape, device and value,
// TypeError for dtype, each naming the argument.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

// AT_DISPATCH over the float dtypes the ops take: float32, float16, bfloat16 (no float64).
#define SUPEREXPERTS_DISPATCH_FLOAT(TYPE, NAME, ...)                               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)      \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace superexperts {

using Dtypes = std::initializer_list<at::ScalarType>;
inline constexpr Dtypes kFloatDtypes = {at::kFloat, at::kHalf, at::kBFloat16};
inline constexpr Dtypes kIndexDtypes = {at::kInt, at::kLong};
inline constexpr Dtypes kBoolDtypes = {at::kBool};

// The name Python gives the dtype (torch.float32 -> "float32").
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(dtype);
  }
}

// A shape as Python prints tuple(t.shape): "(2, 3)", "(5,)", "()".
inline std::string shape_str(const at::Tensor& t) {
  std::string out = "(";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + (t.dim() == 1 ? ",)" : ")");
}

// `t` has rank `ndim`, a dtype in `dtypes` and, with `device_of`, the device of that tensor.
inline void check_tensor(const char* op, const char* name, const at::Tensor& t, int64_t ndim, Dtypes dtypes,
                         const at::Tensor* device_of = nullptr) {
  TORCH_CHECK_VALUE(t.dim() == ndim, op, ": `", name, "` must be ", ndim, "-D, got ", t.dim(), "-D with shape ",
                    shape_str(t));
  bool known = false;
  std::string names;
  for (const auto dtype : dtypes) {
    known = known || t.scalar_type() == dtype;
    names += (names.empty() ? "" : ", ") + dtype_name(dtype);
  }
  TORCH_CHECK_TYPE(known, op, ": `", name, "` must have dtype in (", names, "), got ", dtype_name(t.scalar_type()));
  if (device_of != nullptr) {
    TORCH_CHECK_VALUE(t.device() == device_of->device(), op, ": `", name, "` is on ", t.device(),
                      " but the other inputs are on ", device_of->device());
  }
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": `", name, "` has dtype ", dtype_name(t.scalar_type()),
                   " but `", ref_name, "` has ", dtype_name(ref.scalar_type()), "; they must match");
}

// t.shape[dim] == expected, `what` saying where `expected` comes from.
inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
                      const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, op, ": `", name, "` has size ", t.size(dim), " in dim ", dim, " (shape ",
                    shape_str(t), "); expected ", expected, " to match ", what);
}

}  // namespace superexperts
