// moe_down_proj_profile_native on CUDA: one grouped GEMM writes y, then one stats kernel
// reads every row of y and x once and reduces the statistics of the written values (and
// zeroes the rows past the last expert); a second, row-sized kernel locates the first row
// holding each expert's max. Nothing is read back to the host.
//
// The GEMM is torch._grouped_mm (CUTLASS, fp32 accumulation, one rounding) for bf16 inputs
// with 16-byte aligned rows and no bias: the case its kernels take. Otherwise (fp16, fp32,
// a bias, odd sizes) one ATen GEMM per expert with rows, which needs the row ends on the
// host (one device sync).
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

// One block per row. A row past the last expert is zeroed (the GEMM leaves it unwritten).
// A routed row, with stats: its max |y| and first channel, its max |x|, and the atomic
// merges into the per-expert maxima (and per-channel maxima when `chan_bits`).
template <typename scalar_t>
__global__ void row_stats_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
                                 const int64_t* __restrict__ ends, int64_t num_experts, int64_t hidden,
                                 int64_t inter, bool with_stats, float* __restrict__ row_max,
                                 int64_t* __restrict__ row_channel, unsigned* out_bits, unsigned* in_bits,
                                 unsigned* chan_bits) {
  __shared__ unsigned s_bits[kThreads];
  __shared__ int64_t s_channel[kThreads];
  __shared__ unsigned s_in[kThreads];
  const int64_t row = blockIdx.x;
  if (row >= ends[num_experts - 1]) {
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) y[row * hidden + c] = scalar_t(0);
    return;
  }
  if (!with_stats) return;
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
  if (row >= routed || row >= ends[num_experts - 1]) return;
  const int64_t e = expert_of(ends, num_experts, row);
  if (__float_as_uint(row_max[row]) == out_bits[e]) atomicMin(first + e, static_cast<unsigned long long>(row));
}

bool grouped_mm_applies(const at::Tensor& x, const at::Tensor& w_down, const std::optional<at::Tensor>& bias) {
  // _grouped_mm: bf16 operands, strides a multiple of 16 bytes, no bias.
  return x.scalar_type() == at::kBFloat16 && !bias && x.size(1) % 8 == 0 && w_down.size(1) % 8 == 0 &&
         w_down.size(2) % 8 == 0;
}

// y[start:end] = x[start:end] @ w_e^T (+ bias[e]) per expert, from the row ends on the host.
void per_expert_gemms(const at::Tensor& xc, const at::Tensor& w_down, const std::optional<at::Tensor>& bias,
                      bool w_transposed, const at::Tensor& offsets, at::Tensor& y) {
  const std::vector<int64_t> ends = row_ends(offsets, xc.size(0));
  for (int64_t e = 0, start = 0; e < static_cast<int64_t>(ends.size()); start = ends[e++]) {
    if (ends[e] == start) continue;
    const at::Tensor x_e = xc.narrow(0, start, ends[e] - start);
    const at::Tensor w_e = w_transposed ? w_down[e] : w_down[e].t();  // [I, H]
    at::Tensor y_e = y.narrow(0, start, ends[e] - start);
    if (bias) at::addmm_out(y_e, (*bias)[e], x_e, w_e); else at::mm_out(y_e, x_e, w_e);
  }
}

DownProjOutputs moe_down_proj_profile_cuda(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& offsets,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& row_token, bool w_transposed,
                                           bool channel_stats, bool with_stats) {
  const int64_t hidden = check_down_proj_args(x, w_down, offsets, bias, row_token, w_transposed);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t num_rows = x.size(0), num_experts = w_down.size(0);
  const auto dev = x.options();
  const auto f32 = dev.dtype(at::kFloat);
  const at::Tensor ends_dev = offsets.to(at::kLong).clamp(0, num_rows);
  const at::Tensor rows = at::diff(ends_dev, 1, 0, ends_dev.new_zeros({1}));
  at::Tensor out_absmax = at::zeros({num_experts}, f32);
  at::Tensor out_argmax = at::full({num_experts, 2}, -1, dev.dtype(at::kLong));
  at::Tensor in_absmax = at::zeros({num_experts}, f32);
  at::Tensor channel_absmax = at::zeros({num_experts, channel_stats ? hidden : 0}, f32);
  if (num_rows == 0) return {x.new_empty({0, hidden}), out_absmax, out_argmax, in_absmax, rows, channel_absmax};

  const at::Tensor xc = x.contiguous();
  at::Tensor y;
  if (grouped_mm_applies(xc, w_down, bias)) {
    const at::Tensor w_t = w_transposed ? w_down : w_down.transpose(1, 2);  // [E, I, H]
    y = at::_grouped_mm(xc, w_t, offsets.to(at::kInt));
  } else {
    y = at::empty({num_rows, hidden}, dev);
    per_expert_gemms(xc, w_down, bias, w_transposed, offsets, y);
  }

  at::Tensor out_bits = at::zeros({num_experts}, dev.dtype(at::kInt));
  at::Tensor in_bits = at::zeros({num_experts}, dev.dtype(at::kInt));
  at::Tensor chan_bits = at::zeros({num_experts, channel_stats ? hidden : 0}, dev.dtype(at::kInt));
  at::Tensor row_max = at::zeros({num_rows}, f32);
  at::Tensor row_channel = at::zeros({num_rows}, dev.dtype(at::kLong));
  at::Tensor first = at::full({num_experts}, num_rows, dev.dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SUPEREXPERTS_DISPATCH_FLOAT(x.scalar_type(), "moe_down_proj_profile_native", [&] {
    row_stats_kernel<scalar_t><<<num_rows, kThreads, 0, stream>>>(
        y.data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), ends_dev.const_data_ptr<int64_t>(),
        num_experts, hidden, x.size(1), with_stats, row_max.data_ptr<float>(), row_channel.data_ptr<int64_t>(),
        reinterpret_cast<unsigned*>(out_bits.data_ptr<int>()), reinterpret_cast<unsigned*>(in_bits.data_ptr<int>()),
        channel_stats ? reinterpret_cast<unsigned*>(chan_bits.data_ptr<int>()) : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!with_stats) return {y, out_absmax, out_argmax, in_absmax, rows, channel_absmax};
  first_row_kernel<<<(num_rows + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      row_max.const_data_ptr<float>(), ends_dev.const_data_ptr<int64_t>(), num_experts, num_rows,
      reinterpret_cast<const unsigned*>(out_bits.const_data_ptr<int>()),
      reinterpret_cast<unsigned long long*>(first.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor has_rows = rows > 0;
  const at::Tensor row = first.clamp_max(num_rows - 1);
  const at::Tensor located = row_token ? row_token->to(at::kLong).index_select(0, row) : row;
  out_argmax.select(1, 0).copy_(at::where(has_rows, located, -1));
  out_argmax.select(1, 1).copy_(at::where(has_rows, row_channel.index_select(0, row), -1));
  out_absmax.copy_(out_bits.view(at::kFloat));
  in_absmax.copy_(in_bits.view(at::kFloat));
  if (channel_stats) channel_absmax.copy_(chan_bits.view(at::kFloat));
  return {y, out_absmax, out_argmax, in_absmax, rows, channel_absmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(superexperts, CUDA, m) {
  m.impl("moe_down_proj_profile_native", &moe_down_proj_profile_cuda);
}

}  // namespace superexperts
