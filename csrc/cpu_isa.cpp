// Run-time choices of the native CPU kernels: which compiled copy of the vector loops
// (cpu_isa.h) and which dtype the down projection's GEMMs run in.
#include "cpu_isa.h"

#include <ATen/Version.h>
#include <ATen/cpu/Utils.h>
#include <c10/util/Exception.h>

#include <atomic>

namespace superexperts::cpu {
namespace {

bool cpu_has(const char* feature) {
  static const auto features = at::cpu::get_cpu_capabilities();
  const auto it = features.find(feature);
  return it != features.end() && it->second.isBool() && it->second.toBool();
}

const Kernels* choose() {
  // ATen's own choice: what this CPU runs, lowered by ATEN_CPU_CAPABILITY when that is set.
  const std::string aten = at::get_cpu_capability();
  const bool avx512 = aten == "AVX512" && cpu_has("avx512_f") && cpu_has("avx512_bw") && cpu_has("avx512_vl") &&
                      cpu_has("avx512_dq");
  const bool avx2 = (aten == "AVX512" || aten == "AVX2") && cpu_has("avx2") && cpu_has("fma3") &&
                    cpu_has("f16c") && cpu_has("bmi2");
  if (avx512 && kernels_avx512()) return kernels_avx512();
  if ((avx512 || avx2) && kernels_avx2()) return kernels_avx2();
  return kernels_default();
}

enum class Policy : int { kAuto, kFloat32, kInput };
std::atomic<Policy> policy{Policy::kAuto};

}  // namespace

const Kernels& kernels() {
  static const Kernels* chosen = choose();
  return *chosen;
}

c10::ScalarType gemm_dtype(c10::ScalarType dtype) {
  if (dtype == c10::kFloat) return dtype;
  switch (policy.load()) {
    case Policy::kFloat32:
      return c10::kFloat;
    case Policy::kInput:
      return dtype;
    case Policy::kAuto:
      break;
  }
  // torch's bf16/fp16 GEMMs (oneDNN) run on bf16/fp16 instructions only where the CPU has
  // them; elsewhere they are several times slower than fp32 GEMMs on upcast blocks.
  static const bool bf16 = cpu_has("avx512_bf16") || cpu_has("amx_bf16");
  static const bool fp16 = cpu_has("avx512_fp16") || cpu_has("amx_fp16");
  const bool native = dtype == c10::kBFloat16 ? bf16 : dtype == c10::kHalf ? fp16 : false;
  return native ? dtype : c10::kFloat;
}

void set_gemm_policy(const std::string& name) {
  if (name == "auto") {
    policy = Policy::kAuto;
  } else if (name == "float32") {
    policy = Policy::kFloat32;
  } else if (name == "input") {
    policy = Policy::kInput;
  } else {
    TORCH_CHECK_VALUE(false, "superexperts: the CPU GEMM policy must be 'auto', 'float32' or 'input', got '", name,
                      "'");
  }
}

std::string gemm_policy() {
  switch (policy.load()) {
    case Policy::kFloat32:
      return "float32";
    case Policy::kInput:
      return "input";
    case Policy::kAuto:
      break;
  }
  return "auto";
}

}  // namespace superexperts::cpu
