// torch.ops.superexperts.fused_moe_cpu_native: one whole MoE layer on the CPU (both grouped
// GEMMs, the gated activation, the routing weights, the top-k sum) with the down
// projection's per-expert statistics taken on the way, from weights prepacked once at load.
//
// Layouts (superexperts_kernels/fused_moe_cpu.py packs them):
//   w13p [E, I/8, H, 16]: panel p holds gate columns 8p..8p+7 then up columns 8p..8p+7, each
//        k-row of 16 contiguous, so one micro-kernel pass gives gate and up of 8 features;
//   w2p  [E, H/16, I, 16]: panel q holds output channels 16q..16q+15.
// x [M, H] and the weights share a dtype (float32, float16, bfloat16); accumulation is fp32.
// The activation output is rounded to that dtype (as the unfused model computes it) and so is
// every down_proj output row before its statistics are taken and its routing weight applied.
//
// topk_ids [M, k] hold local expert ids, -1 for rows to skip (other ranks' experts, padding
// tokens); row_ref [M] int64 is the token reference reported in out_argmax[:, 0].
// Statistics: out_absmax [E] fp32 max |down_proj output| (-1 for experts without rows),
// out_argmax [E, 2] (row_ref of that row, channel; -1 without rows) with the first row (in
// token order) then the lowest channel winning ties and NaN winning over numbers,
// in_absmax [E] fp32 max |activation|, rows [E] int64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SUPEREXPERTS_X86 1
#include <immintrin.h>
#endif

namespace superexperts {
namespace {

constexpr int kMR = 6;  // rows per micro-kernel pass
constexpr int kNR = 16;  // output columns per panel

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

#if defined(SUPEREXPERTS_X86)
// The AVX2 micro-kernel is compiled for its own target and called only where the run-time
// choice of cpu_isa.h is avx2 or above (no -m flag on the build's command line).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// 16 weights of one k-row of a panel as two fp32 vectors.
inline void load16(const float* p, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(p);
  hi = _mm256_loadu_ps(p + 8);
}
inline void load16(const c10::BFloat16* p, __m256& lo, __m256& hi) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16));
  hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16));
}
inline void load16(const c10::Half* p, __m256& lo, __m256& hi) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(raw));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(raw, 1));
}

// c[MR][16] = a x b[K][16] with a a block of MR rows packed k-major (row m, k at a[k * MR + m]),
// fp32 accumulation. Few rows leave FMA latency exposed, so U partial sums over interleaved k
// keep ~12 FMA chains in flight.
template <int MR, typename W>
void micro_kernel_avx2(const float* a, const W* b, int64_t K, float* c) {
  constexpr int U = MR >= 4 ? 1 : 6 / MR;
  __m256 acc[U][MR][2];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MR; ++m) acc[u][m][0] = acc[u][m][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    for (int u = 0; u < U; ++u) {
      __m256 b0, b1;
      load16(b + (k + u) * kNR, b0, b1);
      for (int m = 0; m < MR; ++m) {
        const __m256 av = _mm256_broadcast_ss(a + (k + u) * MR + m);
        acc[u][m][0] = _mm256_fmadd_ps(av, b0, acc[u][m][0]);
        acc[u][m][1] = _mm256_fmadd_ps(av, b1, acc[u][m][1]);
      }
    }
  }
  for (; k < K; ++k) {
    __m256 b0, b1;
    load16(b + k * kNR, b0, b1);
    for (int m = 0; m < MR; ++m) {
      const __m256 av = _mm256_broadcast_ss(a + k * MR + m);
      acc[0][m][0] = _mm256_fmadd_ps(av, b0, acc[0][m][0]);
      acc[0][m][1] = _mm256_fmadd_ps(av, b1, acc[0][m][1]);
    }
  }
  for (int u = 1; u < U; ++u)
    for (int m = 0; m < MR; ++m) {
      acc[0][m][0] = _mm256_add_ps(acc[0][m][0], acc[u][m][0]);
      acc[0][m][1] = _mm256_add_ps(acc[0][m][1], acc[u][m][1]);
    }
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(c + m * kNR, acc[0][m][0]);
    _mm256_storeu_ps(c + m * kNR + 8, acc[0][m][1]);
  }
}
#pragma GCC pop_options
#endif

template <int MR, typename W>
inline void micro_kernel_portable(const float* a, const W* b, int64_t K, float* c) {
  float acc[MR][kNR] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int m = 0; m < MR; ++m) {
      const float av = a[k * MR + m];
      for (int n = 0; n < kNR; ++n) acc[m][n] += av * to_float(b[k * kNR + n]);
    }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < kNR; ++n) c[m * kNR + n] = acc[m][n];
}

template <bool kAvx2, int MR, typename W>
inline void micro_kernel(const float* a, const W* b, int64_t K, float* c) {
#if defined(SUPEREXPERTS_X86)
  if constexpr (kAvx2) {
    micro_kernel_avx2<MR, W>(a, b, K, c);
    return;
  }
#endif
  micro_kernel_portable<MR, W>(a, b, K, c);
}

bool use_avx2() {
#if defined(SUPEREXPERTS_X86)
  static const bool avx2 = std::string(cpu::kernels().name) != "default";
  return avx2;
#else
  return false;
#endif
}

// Rows of one expert are packed in blocks of kMR (the last block holds the rest): row r of
// the expert, k at a[(r / kMR) * kMR * K + k * mr + r % kMR], mr the rows of its block.
inline int64_t packed_index(int64_t r, int64_t rows, int64_t k, int64_t K) {
  const int64_t block = r / kMR * kMR;
  return block * K + k * std::min<int64_t>(kMR, rows - block) + (r - block);
}

template <bool kAvx2, typename W>
void panel_rows(const float* a, int64_t rows, const W* b, int64_t K, float* c) {
  int64_t r = 0;
  for (; r + kMR <= rows; r += kMR) micro_kernel<kAvx2, kMR, W>(a + r * K, b, K, c + r * kNR);
  const float* ar = a + r * K;
  float* cr = c + r * kNR;
  switch (rows - r) {
    case 5: micro_kernel<kAvx2, 5, W>(ar, b, K, cr); break;
    case 4: micro_kernel<kAvx2, 4, W>(ar, b, K, cr); break;
    case 3: micro_kernel<kAvx2, 3, W>(ar, b, K, cr); break;
    case 2: micro_kernel<kAvx2, 2, W>(ar, b, K, cr); break;
    case 1: micro_kernel<kAvx2, 1, W>(ar, b, K, cr); break;
    default: break;
  }
}

// c[rows][16] = (packed rows of one expert) x b[K][16]. With more than one block of rows, the
// panel is widened to fp32 once (into `wide`, K * 16 floats) instead of in every block.
template <typename W>
void panel_gemm(const float* a, int64_t rows, const W* b, int64_t K, float* c, float* wide) {
  if (!std::is_same<W, float>::value && rows > kMR) {
    for (int64_t i = 0; i < K * kNR; ++i) wide[i] = to_float(b[i]);
    panel_gemm<float>(a, rows, wide, K, c, nullptr);
    return;
  }
  if (use_avx2()) {
    panel_rows<true, W>(a, rows, b, K, c);
  } else {
    panel_rows<false, W>(a, rows, b, K, c);
  }
}

inline float activate(int act, float g) {
  switch (act) {
    case 0: return g / (1.0f + std::exp(-g));  // silu
    case 1: return 0.5f * g * (1.0f + std::erf(g * 0.70710678118654752f));  // gelu
    default: {  // gelu, tanh approximation
      const float inner = 0.79788456080286536f * (g + 0.044715f * g * g * g);
      return 0.5f * g * (1.0f + std::tanh(inner));
    }
  }
}

// The running max of |v| with its (row, channel): strictly larger wins, NaN wins over numbers.
struct Peak {
  float value = -1.0f;
  int64_t row = -1;
  int64_t channel = -1;
  void offer(float v, int64_t r, int64_t c) {
    const float a = std::fabs(v);
    const bool better = std::isnan(a) ? !std::isnan(value) : (!std::isnan(value) && a > value);
    if (better) value = a, row = r, channel = c;
  }
  // Merge another item's peak of the same expert: larger wins, ties go to the earlier row, then channel.
  void merge(const Peak& o) {
    if (o.row < 0) return;
    if (row < 0) { *this = o; return; }
    const bool o_nan = std::isnan(o.value), nan = std::isnan(value);
    bool take;
    if (o_nan != nan) take = o_nan;
    else if (!nan && o.value != value) take = o.value > value;
    else take = o.row < row || (o.row == row && o.channel < channel);
    if (take) *this = o;
  }
};

template <typename T>
std::vector<at::Tensor> fused_moe_impl(const at::Tensor& x, const at::Tensor& w13p, const at::Tensor& w2p,
                                       const at::Tensor& topk_weights, const at::Tensor& topk_ids_in,
                                       const at::Tensor& row_ref_in, int64_t act, bool weights_on_input) {
  const int64_t M = x.size(0), H = x.size(1), E = w13p.size(0), I = w13p.size(1) * 8, k = topk_ids_in.size(1);
  const auto ids = topk_ids_in.to(at::kLong).contiguous();
  const auto row_ref = row_ref_in.to(at::kLong).contiguous();
  const auto weights = topk_weights.to(at::kFloat).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const T* xp = x.data_ptr<T>();
  const T* b13 = w13p.data_ptr<T>();
  const T* b2 = w2p.data_ptr<T>();

  // Rows grouped by expert, each expert's rows in token order: slot = token * k + j.
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t s = 0; s < M * k; ++s)
    if (id[s] >= 0) ++start[id[s] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const int64_t S = start[E];
  std::vector<int64_t> slot_of(S), fill(start.begin(), start.end() - 1);
  for (int64_t s = 0; s < M * k; ++s)
    if (id[s] >= 0) slot_of[fill[id[s]]++] = s;

  // Gathered inputs in fp32, then the activation of each row (rounded to T), both packed per
  // expert (packed_index). Uninitialized scratch: every element read is written first.
  std::unique_ptr<float[]> a1(new float[S * H]), a2(new float[S * I]), yw(new float[M * k * H]);
  at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t rows = start[e + 1] - start[e];
      float* dst = a1.get() + start[e] * H;
      for (int64_t r = 0; r < rows; ++r) {
        const T* src = xp + (slot_of[start[e] + r] / k) * H;
        const int64_t block = r / kMR * kMR, mr = std::min<int64_t>(kMR, rows - block);
        float* row = dst + block * H + (r - block);
        for (int64_t h = 0; h < H; ++h) row[h * mr] = to_float(src[h]);
      }
    }
  });

  // Work items (expert, panel); cost ~ rows of the expert.
  const int64_t P1 = I / 8, P2 = H / kNR;
  std::vector<float> in_part(E * P1, 0.0f);
  std::vector<Peak> out_part(E * P2);
  std::vector<char> routed(M * k, 0);
  for (int64_t r = 0; r < S; ++r) routed[slot_of[r]] = 1;

  const int64_t max_rows = [&] {
    int64_t m = 0;
    for (int64_t e = 0; e < E; ++e) m = std::max(m, start[e + 1] - start[e]);
    return m;
  }();

#pragma omp parallel
  {
    std::vector<float> tile(max_rows * kNR), wide(std::max(H, I) * kNR);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < E * P1; ++item) {
      const int64_t e = item / P1, p = item % P1, rows = start[e + 1] - start[e];
      if (rows == 0) continue;
      panel_gemm<T>(a1.get() + start[e] * H, rows, b13 + (e * P1 + p) * H * kNR, H, tile.data(), wide.data());
      float in_max = 0.0f;
      float* act_e = a2.get() + start[e] * I;
      for (int64_t r = 0; r < rows; ++r) {
        for (int c = 0; c < 8; ++c) {
          const float gate = round_to<T>(tile[r * kNR + c]), up = round_to<T>(tile[r * kNR + 8 + c]);
          const float v = round_to<T>(round_to<T>(activate(act, gate)) * up);
          act_e[packed_index(r, rows, p * 8 + c, I)] = v;
          in_max = std::isnan(v) || std::isnan(in_max) ? NAN : std::max(in_max, std::fabs(v));
        }
      }
      in_part[item] = in_max;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < E * P2; ++item) {
      const int64_t e = item / P2, q = item % P2, rows = start[e + 1] - start[e];
      if (rows == 0) continue;
      panel_gemm<T>(a2.get() + start[e] * I, rows, b2 + (e * P2 + q) * I * kNR, I, tile.data(), wide.data());
      Peak peak;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t slot = slot_of[start[e] + r];
        const float w = weights_on_input ? 1.0f : weights.data_ptr<float>()[slot];
        float* dst = yw.get() + slot * H + q * kNR;
        for (int c = 0; c < kNR; ++c) {
          const float v = round_to<T>(tile[r * kNR + c]);
          peak.offer(v, r, q * kNR + c);
          dst[c] = v * w;
        }
      }
      out_part[item] = peak;
    }
  }

  auto out = at::empty({M, H}, x.options());
  T* op = out.data_ptr<T>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> acc(H);
    for (int64_t m = m0; m < m1; ++m) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        if (!routed[m * k + j]) continue;
        const float* src = yw.get() + (m * k + j) * H;
        for (int64_t h = 0; h < H; ++h) acc[h] += src[h];
      }
      for (int64_t h = 0; h < H; ++h) op[m * H + h] = static_cast<T>(acc[h]);
    }
  });

  auto f32 = x.options().dtype(at::kFloat), i64 = x.options().dtype(at::kLong);
  auto out_absmax = at::full({E}, -1.0f, f32), in_absmax = at::zeros({E}, f32);
  auto out_argmax = at::full({E, 2}, -1, i64), rows_t = at::zeros({E}, i64);
  const int64_t* ref = row_ref.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = start[e + 1] - start[e];
    rows_t.data_ptr<int64_t>()[e] = rows;
    if (rows == 0) continue;
    Peak peak;
    for (int64_t q = 0; q < P2; ++q) peak.merge(out_part[e * P2 + q]);
    out_absmax.data_ptr<float>()[e] = peak.value;
    out_argmax.data_ptr<int64_t>()[2 * e] = ref[slot_of[start[e] + peak.row] / k];
    out_argmax.data_ptr<int64_t>()[2 * e + 1] = peak.channel;
    float in_max = 0.0f;
    for (int64_t p = 0; p < P1; ++p) {
      const float v = in_part[e * P1 + p];
      in_max = std::isnan(v) || std::isnan(in_max) ? NAN : std::max(in_max, v);
    }
    in_absmax.data_ptr<float>()[e] = in_max;
  }
  return {out, out_absmax, out_argmax, in_absmax, rows_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_cpu(
    const at::Tensor& x, const at::Tensor& w13p, const at::Tensor& w2p, const at::Tensor& topk_weights,
    const at::Tensor& topk_ids, const at::Tensor& row_ref, int64_t activation, bool weights_on_input) {
  constexpr const char* op = "superexperts::fused_moe_cpu_native";
  TORCH_CHECK_VALUE(x.dim() == 2 && w13p.dim() == 4 && w2p.dim() == 4, op,
                    ": expected x [M, H], w13p [E, I/8, H, 16], w2p [E, H/16, I, 16]");
  TORCH_CHECK_VALUE(w13p.size(3) == kNR && w2p.size(3) == kNR && w13p.size(2) == x.size(1) &&
                        w2p.size(0) == w13p.size(0) && w2p.size(1) * kNR == x.size(1) &&
                        w2p.size(2) == w13p.size(1) * 8,
                    op, ": packed weight shapes ", w13p.sizes(), " and ", w2p.sizes(), " do not fit x ", x.sizes());
  TORCH_CHECK_TYPE(w13p.scalar_type() == x.scalar_type() && w2p.scalar_type() == x.scalar_type(), op,
                   ": x and the packed weights must share a dtype");
  TORCH_CHECK_VALUE(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) && topk_weights.sizes() == topk_ids.sizes() &&
                        row_ref.dim() == 1 && row_ref.size(0) == x.size(0),
                    op, ": topk_ids / topk_weights must be [M, k] and row_ref [M]");
  TORCH_CHECK_VALUE(activation >= 0 && activation <= 2, op, ": activation must be 0 (silu), 1 (gelu) or 2 (gelu_tanh)");
  const auto xc = x.contiguous(), a = w13p.contiguous(), b = w2p.contiguous();
  std::vector<at::Tensor> r;
  AT_DISPATCH_SWITCH(x.scalar_type(), "fused_moe_cpu_native",
                     AT_DISPATCH_CASE(at::kFloat, [&] { r = fused_moe_impl<float>(xc, a, b, topk_weights, topk_ids, row_ref, activation, weights_on_input); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { r = fused_moe_impl<c10::BFloat16>(xc, a, b, topk_weights, topk_ids, row_ref, activation, weights_on_input); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { r = fused_moe_impl<c10::Half>(xc, a, b, topk_weights, topk_ids, row_ref, activation, weights_on_input); }));
  return {r[0], r[1], r[2], r[3], r[4]};
}

}  // namespace
}  // namespace superexperts

TORCH_LIBRARY_FRAGMENT(superexperts, m) {
  m.def(
      "fused_moe_cpu_native(Tensor x, Tensor w13p, Tensor w2p, Tensor topk_weights, Tensor topk_ids, "
      "Tensor row_ref, int activation=0, bool weights_on_input=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(superexperts, CPU, m) { m.impl("fused_moe_cpu_native", &superexperts::fused_moe_cpu); }

TORCH_LIBRARY_IMPL(superexperts, Autograd, m) {
  m.impl("fused_moe_cpu_native", torch::autograd::autogradNotImplementedFallback());
}
