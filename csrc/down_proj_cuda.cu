// moe_down_proj_profile_native on CUDA: one ATen (cuBLAS) GEMM per expert with rows writes y
// (fp32 accumulation, one rounding to x.dtype, the bias added before it), then one stats
// kernel reads every routed row of y and x once and reduces the statistics of the written
// values; a second, row-sized kernel locates the first row holding each expert's max.
//
// Max |y| is reduced with atomicMax on the fp32 bits: |y| >= 0, so its bits order like the
// values, and a NaN (bits above +inf) wins, as it does in torch.max.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "down_proj.h"

namespace superexperts {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t expert_of(const int64_t* ends, int64_t num_experts, int64_t row) {
  int64_t lo = 0, hi = num_experts - 1;  // first e with ends[e] > row
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (ends[mid] > row) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// One block per routed row: the row's max |y| and its first channel, its max |x|, and the
// atomic merges into the per-expert maxima (and per-channel maxima when `chan_bits`).
template <typename scalar_t>
__global__ void row_stats_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
                                 const int64_t* __restrict__ ends, int64_t num_experts, int64_t hidden,
                                 int64_t inter, float* __restrict__ row_max, int64_t* __restrict__ row_channel,
                                 unsigned* out_bits, unsigned* in_bits, unsigned* chan_bits) {
  __shared__ unsigned s_bits[kThreads];
  __shared__ int64_t s_channel[kThreads];
  __shared__ unsigned s_in[kThreads];
  const int64_t row = blockIdx.x;
  const int64_t e = expert_of(ends, num_experts, row);

  unsigned best = 0;
  int64_t best_c = hidden;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
    const unsigned bits = __float_as_uint(fabsf(static_cast<float>(y[row * hidden + c])));
    if (bits > best || best_c == hidden) {
      best = bits;
      best_c = c;
    }
    if (chan_bits) atomicMax(chan_bits + e * hidden + c, bits);
  }
  unsigned in_best = 0;
  for (int64_t c = threadIdx.x; c < inter; c += blockDim.x) {
    in_best = max(in_best, __float_as_uint(fabsf(static_cast<float>(x[row * inter + c]))));
  }
  s_bits[threadIdx.x] = best;
  s_channel[threadIdx.x] = best_c;
  s_in[threadIdx.x] = in_best;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const int other = threadIdx.x + stride;
      const bool take = s_bits[other] > s_bits[threadIdx.x] ||
                        (s_bits[other] == s_bits[threadIdx.x] && s_channel[other] < s_channel[threadIdx.x]);
      if (take) {
        s_bits[threadIdx.x] = s_bits[other];
        s_channel[threadIdx.x] = s_channel[other];
      }
      s_in[threadIdx.x] = max(s_in[threadIdx.x], s_in[other]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    row_max[row] = __uint_as_float(s_bits[0]);
    row_channel[row] = s_channel[0];
    atomicMax(out_bits + e, s_bits[0]);
    atomicMax(in_bits + e, s_in[0]);
  }
}

// first[e] = the first row of expert e whose max |y| is the expert's max.
__global__ void first_row_kernel(const float* __restrict__ row_max, const int64_t* __restrict__ ends,
                                 int64_t num_experts, int64_t routed, const unsigned* __restrict__ out_bits,
                                 unsigned long long* first) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= routed) return;
  const int64_t e = expert_of(ends, num_experts, row);
  if (__float_as_uint(row_max[row]) == out_bits[e]) atomicMin(first + e, static_cast<unsigned long long>(row));
}

DownProjOutputs moe_down_proj_profile_cuda(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& offsets,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& row_token, bool w_transposed,
                                           bool channel_stats, bool with_stats) {
  const int64_t hidden = check_down_proj_args(x, w_down, offsets, bias, row_token, w_transposed);
  const c10::cuda::CUDAGuard guard(x.device());
  const std::vector<int64_t> ends = row_ends(offsets, x.size(0));
  auto outputs = empty_outputs(x, hidden, ends, channel_stats);
  auto& [y, out_absmax, out_argmax, in_absmax, rows, channel_absmax] = outputs;
  const int64_t num_experts = static_cast<int64_t>(ends.size()), routed = ends.back();
  y.narrow(0, routed, x.size(0) - routed).zero_();
  if (routed == 0) return outputs;

  const at::Tensor xc = x.contiguous();
  for (int64_t e = 0, start = 0; e < num_experts; start = ends[e++]) {
    if (ends[e] == start) continue;
    const at::Tensor x_e = xc.narrow(0, start, ends[e] - start);
    const at::Tensor w_e = w_transposed ? w_down[e] : w_down[e].t();  // [I, H]
    at::Tensor y_e = y.narrow(0, start, ends[e] - start);
    if (bias) at::addmm_out(y_e, (*bias)[e], x_e, w_e); else at::mm_out(y_e, x_e, w_e);
  }
  if (!with_stats) return outputs;

  const auto dev = x.options();
  const at::Tensor ends_dev = at::tensor(ends, at::kLong).to(x.device());
  at::Tensor out_bits = at::zeros({num_experts}, dev.dtype(at::kInt));
  at::Tensor in_bits = at::zeros({num_experts}, dev.dtype(at::kInt));
  at::Tensor chan_bits = at::zeros({num_experts, channel_stats ? hidden : 0}, dev.dtype(at::kInt));
  at::Tensor row_max = at::empty({routed}, dev.dtype(at::kFloat));
  at::Tensor row_channel = at::empty({routed}, dev.dtype(at::kLong));
  at::Tensor first = at::full({num_experts}, routed, dev.dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SUPEREXPERTS_DISPATCH_FLOAT(x.scalar_type(), "moe_down_proj_profile_native", [&] {
    row_stats_kernel<scalar_t><<<routed, kThreads, 0, stream>>>(
        y.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), ends_dev.const_data_ptr<int64_t>(),
        num_experts, hidden, x.size(1), row_max.data_ptr<float>(), row_channel.data_ptr<int64_t>(),
        reinterpret_cast<unsigned*>(out_bits.data_ptr<int>()), reinterpret_cast<unsigned*>(in_bits.data_ptr<int>()),
        channel_stats ? reinterpret_cast<unsigned*>(chan_bits.data_ptr<int>()) : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  first_row_kernel<<<(routed + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      row_max.const_data_ptr<float>(), ends_dev.const_data_ptr<int64_t>(), num_experts, routed,
      reinterpret_cast<const unsigned*>(out_bits.const_data_ptr<int>()),
      reinterpret_cast<unsigned long long*>(first.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor has_rows = rows > 0;
  const at::Tensor row = first.clamp_max(routed - 1);
  const at::Tensor located = row_token ? row_token->to(at::kLong).index_select(0, row) : row;
  out_argmax.select(1, 0).copy_(at::where(has_rows, located, -1));
  out_argmax.select(1, 1).copy_(at::where(has_rows, row_channel.index_select(0, row), -1));
  out_absmax.copy_(out_bits.view(at::kFloat));
  in_absmax.copy_(in_bits.view(at::kFloat));
  if (channel_stats) channel_absmax.copy_(chan_bits.view(at::kFloat));
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(superexperts, CUDA, m) {
  m.impl("moe_down_proj_profile_native", &moe_down_proj_profile_cuda);
}

}  // namespace superexperts
