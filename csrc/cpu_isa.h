// The vectorized loops of the native CPU kernels, compiled once per instruction set and chosen
// at run time, the way ATen chooses its own kernels: no -m flag on the build's command line.
//
// cpu_isa_kernels.h holds the loops; cpu_isa_default.cpp, cpu_isa_avx2.cpp and
// cpu_isa_avx512.cpp each compile them with the target of their name (set in the file with
// `#pragma GCC target`, ATen's CPU_CAPABILITY macros and at::vec types). `kernels()` picks the
// highest one that the CPU runs and that ATen itself uses (at::get_cpu_capability(), so
// ATEN_CPU_CAPABILITY=default or avx2 lowers both).
//
// Maxima here order NaN above every number (as torch.max does): a NaN in the data shows in the
// statistics instead of being skipped.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace superexperts::cpu {

// Loops over one dtype T of y, x, q or o (float, c10::BFloat16, c10::Half).
template <typename T>
struct TypedKernels {
  // out[c] = T(acc[c] + bias[c]) for c < n (bias may be null). Returns max |out[c]| of the
  // rounded values and folds |out[c]| into chan[c] (when not null).
  float (*round_row)(const float* acc, const float* bias, T* out, float* chan, int64_t n);
  // The same without the statistics.
  void (*round_row_nostats)(const float* acc, const float* bias, T* out, int64_t n);
  // max |x[c]| for c < n, folding |x[c]| into chan[c] (when not null).
  float (*absmax_row)(const T* x, float* chan, int64_t n);
  // dst[c] = float(src[c]) * scale.
  void (*to_float)(const T* src, float scale, float* dst, int64_t n);
  // dst[c] = T(src[c] * scale).
  void (*from_float)(const float* src, float scale, T* dst, int64_t n);
};

struct Kernels {
  const char* name;  // "default", "avx2" or "avx512"
  TypedKernels<float> f32;
  TypedKernels<c10::BFloat16> bf16;
  TypedKernels<c10::Half> f16;
  // max x[j] for j < n (-inf when n = 0; NaN when one is NaN).
  float (*max)(const float* x, int64_t n);
  // x[j] = exp(x[j] - m) for j < n; returns their sum.
  float (*exp_sum)(float* x, int64_t n, float m);
  // x[j] *= alpha for j < n.
  void (*scale)(float* x, int64_t n, float alpha);

  template <typename T>
  const TypedKernels<T>& of() const {
    if constexpr (std::is_same_v<T, float>) {
      return f32;
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return bf16;
    } else {
      return f16;
    }
  }
};

// The tables each instruction-set file defines; null when the file was built without its
// target (a compiler other than GCC, or not x86-64).
const Kernels* kernels_default();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

// The table for this CPU, chosen on first use.
const Kernels& kernels();

// The dtype the down projection's GEMMs run in for inputs of `dtype`: the dtype itself where
// torch's GEMM for it is native to the CPU (float32 always; bfloat16 with avx512_bf16 or AMX;
// float16 with avx512_fp16 or AMX-FP16), else float32 on upcast blocks.
c10::ScalarType gemm_dtype(c10::ScalarType dtype);

// Overrides `gemm_dtype` for the 16-bit dtypes (tests and benchmarks): "auto" (the CPU
// decides), "float32" (always upcast) or "input" (always the input dtype).
void set_gemm_policy(const std::string& policy);
std::string gemm_policy();

}  // namespace superexperts::cpu
