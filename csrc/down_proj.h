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
//  rows [E] int64, channel_absmax [E, H] fp32, or [E, 0] without channel stats)
using DownProjOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks shapes, dtypes and devices; returns H.
inline int64_t check_down_proj_args(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& offsets,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& row_token, bool w_transposed) {
  const char* op = kDownProjOp;
  check_float(op, "x", x, 2);
  check_float(op, "w_down", w_down, 3);
  check_like(op, "w_down", w_down, "x", x);
  const int64_t num_experts = w_down.size(0);
  TORCH_CHECK_VALUE(num_experts > 0, op, ": `w_down` must hold at least one expert, got shape ", w_down.sizes());
  check_size(op, "w_down", w_down, w_transposed ? 1 : 2, x.size(1),
             w_transposed ? "x.shape[1] (I) for layout [E, I, H] (w_transposed=True)"
                          : "x.shape[1] (I) for layout [E, H, I]");
  const int64_t hidden = w_down.size(w_transposed ? 2 : 1);
  check_index(op, "offsets", offsets, 1, x);
  check_size(op, "offsets", offsets, 0, num_experts, "the number of experts w_down.shape[0]");
  if (bias) {
    check_float(op, "bias", *bias, 2);
    check_like(op, "bias", *bias, "x", x);
    check_size(op, "bias", *bias, 0, num_experts, "the number of experts w_down.shape[0]");
    check_size(op, "bias", *bias, 1, hidden, "the output size H of w_down");
  }
  if (row_token) {
    check_index(op, "row_token", *row_token, 1, x);
    check_size(op, "row_token", *row_token, 0, x.size(0), "the number of rows x.shape[0]");
  }
  return hidden;
}

// `offsets` as int64 cumulative row ends on the host (one device sync on CUDA), checked to be
// non-negative, non-decreasing and at most `num_rows`.
inline std::vector<int64_t> row_ends(const at::Tensor& offsets, int64_t num_rows) {
  const at::Tensor host = offsets.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = host.const_data_ptr<int64_t>();
  std::vector<int64_t> ends(p, p + host.numel());
  int64_t previous = 0;
  for (size_t e = 0; e < ends.size(); ++e) {
    TORCH_CHECK_VALUE(ends[e] >= previous, kDownProjOp, ": `offsets` must be non-negative, non-decreasing ",
                      "cumulative row ends, but offsets[", e, "] = ", ends[e],
                      e ? " < offsets[" + std::to_string(e - 1) + "] = " + std::to_string(previous) : "");
    previous = ends[e];
  }
  TORCH_CHECK_VALUE(previous <= num_rows, kDownProjOp, ": `offsets` ends at ", previous, " but `x` has only ",
                    num_rows, " rows");
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
          at::zeros({num_experts, channel_stats ? hidden : 0}, f32)};
}

}  // namespace superexperts
