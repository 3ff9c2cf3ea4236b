// Argument checks shared by the native ops. Each raises ValueError (rank, shape, device,
// value) or TypeError (dtype) in Python and names the argument, like
// superexperts_kernels/_validation.py does for the Python ops.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

// AT_DISPATCH over the float dtypes the ops take: float32, float16, bfloat16 (no float64).
#define SUPEREXPERTS_DISPATCH_FLOAT(TYPE, NAME, ...)                               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)      \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace superexperts {

inline bool is_float(const at::Tensor& t) {
  const auto dt = t.scalar_type();
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16;
}

inline bool is_index(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}

inline void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t ndim) {
  TORCH_CHECK_VALUE(t.dim() == ndim, op, ": `", name, "` must be ", ndim, "-D, got ", t.dim(),
                    "-D with shape ", t.sizes());
}

// `t` has rank `ndim` and a float dtype (float32, float16, bfloat16).
inline void check_float(const char* op, const char* name, const at::Tensor& t, int64_t ndim) {
  check_rank(op, name, t, ndim);
  TORCH_CHECK_TYPE(is_float(t), op, ": `", name, "` must be float32, float16 or bfloat16, got ",
                   t.scalar_type());
}

// `t` has rank `ndim`, an int32/int64 dtype and the device of `ref`.
inline void check_index(const char* op, const char* name, const at::Tensor& t, int64_t ndim,
                        const at::Tensor& ref) {
  check_rank(op, name, t, ndim);
  TORCH_CHECK_TYPE(is_index(t), op, ": `", name, "` must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(),
                    " but the other inputs are on ", ref.device());
}

// `t` has the dtype and the device of `ref` (named `ref_name`).
inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": `", name, "` has dtype ",
                   t.scalar_type(), " but `", ref_name, "` has ", ref.scalar_type(),
                   "; they must match");
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(),
                    " but `", ref_name, "` is on ", ref.device());
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                       int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, op, ": `", name, "` has size ", t.size(dim), " in dim ",
                    dim, " (shape ", t.sizes(), "); expected ", expected, " to match ", what);
}

}  // namespace superexperts
