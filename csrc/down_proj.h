// moe_down_proj_profile_native: what the CPU (down_proj.cpp) and CUDA (down_proj_cuda.cu)
// implementations share: argument checks, the row ends on the host, the outputs.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "checks.h"

namespace superexperts {

constexpr const char* kDownProjOp = "superexperts::moe_down_proj_profile_native";

// (y [S, H] x.dtype, out_absmax [E] fp32, out_argmax [E, 2] int64, in_absmax [E] fp32,
//  rows [E] int64, channel_absmax [E, H] fp32, or [E, 0] without channel stats,
//  norm_sum [E] fp32: sum of row_weight[r] * ||y[r]||_2 over the expert's rows, 0 without it)
using DownProjOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks shapes, dtypes and devices; returns H. Mirrors `_validate` in
// superexperts_kernels/moe_down_proj_profile.py, check for check.
inline int64_t check_down_proj_args(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& offsets,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& row_token, bool w_transposed,
                                    const std::optional<at::Tensor>& row_weight) {
  const char* op = kDownProjOp;
  check_tensor(op, "x", x, 2, kFloatDtypes);
  check_tensor(op, "w_down", w_down, 3, kFloatDtypes, &x);
  check_same_dtype(op, "w_down", w_down, "x", x);
  const int64_t num_experts = w_down.size(0);
  TORCH_CHECK_VALUE(num_experts > 0, op, ": `w_down` must hold at least one expert, got shape ", shape_str(w_down));
  check_dim(op, "w_down", w_down, w_transposed ? 1 : 2, x.size(1),
            w_transposed ? "x.shape[1] (I) for layout [E, I, H] (w_transposed=True)"
                         : "x.shape[1] (I) for layout [E, H, I]");
  const int64_t hidden = w_down.size(w_transposed ? 2 : 1);
  check_tensor(op, "offsets", offsets, 1, kIndexDtypes, &x);
  check_dim(op, "offsets", offsets, 0, num_experts, "the number of experts w_down.shape[0]");
  if (bias) {
    check_tensor(op, "bias", *bias, 2, kFloatDtypes, &x);
    check_same_dtype(op, "bias", *bias, "x", x);
    check_dim(op, "bias", *bias, 0, num_experts, "the number of experts w_down.shape[0]");
    check_dim(op, "bias", *bias, 1, hidden, "the output size H of w_down");
  }
  if (row_token) {
    check_tensor(op, "row_token", *row_token, 1, kIndexDtypes, &x);
    check_dim(op, "row_token", *row_token, 0, x.size(0), "the number of rows x.shape[0]");
  }
  if (row_weight) {
    check_tensor(op, "row_weight", *row_weight, 1, {at::kFloat}, &x);
    check_dim(op, "row_weight", *row_weight, 0, x.size(0), "the number of rows x.shape[0]");
  }
  return hidden;
}

// `offsets` as int64 cumulative row ends on the host (one device sync on CUDA), checked as
// `check_offsets_values` in superexperts_kernels/_validation.py does, with its messages.
inline std::vector<int64_t> row_ends(const at::Tensor& offsets, int64_t num_rows) {
  const at::Tensor host = offsets.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = host.const_data_ptr<int64_t>();
  std::vector<int64_t> ends(p, p + host.numel());
  TORCH_CHECK_VALUE(ends[0] >= 0, kDownProjOp, ": `offsets` must be non-negative, got offsets[0] = ", ends[0]);
  for (size_t e = 1; e < ends.size(); ++e) {
    TORCH_CHECK_VALUE(ends[e] >= ends[e - 1], kDownProjOp,
                      ": `offsets` must be non-decreasing cumulative row ends, but offsets[", e, "] = ", ends[e],
                      " < offsets[", e - 1, "] = ", ends[e - 1]);
  }
  TORCH_CHECK_VALUE(ends.back() <= num_rows, kDownProjOp, ": `offsets` ends at ", ends.back(), " but `x` has only ",
                    num_rows, " rows; offsets[-1] must be <= ", num_rows);
  return ends;
}

// The outputs before any row is seen: rows counted from `ends`, stats zero, locations -1.
// `y` is left uninitialized; the callers write every row of it.
inline DownProjOutputs empty_outputs(const at::Tensor& x, int64_t hidden, const std::vector<int64_t>& ends,
                                     bool channel_stats) {
  const int64_t num_experts = static_cast<int64_t>(ends.size());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor rows = at::empty({num_experts}, at::kLong);
  int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t e = 0; e < num_experts; ++e) r[e] = ends[e] - (e ? ends[e - 1] : 0);
  return {at::empty({x.size(0), hidden}, x.options()),
          at::zeros({num_experts}, f32),
          at::full({num_experts, 2}, -1, x.options().dtype(at::kLong)),
          at::zeros({num_experts}, f32),
          rows.to(x.device()),
          at::zeros({num_experts, channel_stats ? hidden : 0}, f32),
          at::zeros({num_experts}, f32)};
}

}  // namespace superexperts
