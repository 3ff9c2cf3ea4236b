// The native ops' schemas and the Python module `superexperts_kernels._native`; importing it
// registers the ops as torch.ops.superexperts.*_native. The kernels are registered per
// device next to their code (TORCH_LIBRARY_IMPL in down_proj.cpp, attention.cpp and, when
// built with CUDA, down_proj_cuda.cu).
//
// These are separate ops, not kernels for torch.ops.superexperts.moe_down_proj_profile /
// attention_with_sink: those are Python custom ops that validate their arguments and pick a
// backend; a C++ CPU kernel registered under their names would bypass both. The public ops name
// these in their backend tables, and register their fake implementations next to their own
// (superexperts_kernels/moe_down_proj_profile.py, attention_with_sink.py).
#include <Python.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>

#include "cpu_isa.h"

TORCH_LIBRARY_FRAGMENT(superexperts, m) {
  m.def(
      "moe_down_proj_profile_native(Tensor x, Tensor w_down, Tensor offsets, Tensor? bias=None, "
      "Tensor? row_token=None, bool w_transposed=False, bool channel_stats=False, bool with_stats=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "attention_with_sink_native(Tensor q, Tensor k, Tensor v, float scale, bool causal=True, "
      "int num_sink_tokens=1, int? sliding_window=None, Tensor? key_padding_mask=None, "
      "Tensor? sink_logits=None) -> (Tensor, Tensor)");
}

// Forward-only ops: the autograd kernel runs the device kernel below autograd (so ATen calls
// with out= on inputs that require grad are fine there) and raises if a backward is asked for.
TORCH_LIBRARY_IMPL(superexperts, Autograd, m) {
  m.impl("moe_down_proj_profile_native", torch::autograd::autogradNotImplementedFallback());
  m.impl("attention_with_sink_native", torch::autograd::autogradNotImplementedFallback());
}

#ifdef SUPEREXPERTS_WITH_CUDA
constexpr long kWithCuda = 1;
#else
constexpr long kWithCuda = 0;
#endif

// CPU_CAPABILITY: the instruction set of the vector loops chosen on this CPU at import
// ("default", "avx2" or "avx512"; cpu_isa.h). cpu_gemm_dtype(dtype): the dtype the CPU down
// projection's GEMMs run in for inputs of `dtype` (a torch dtype name, e.g. "bfloat16").
// set_cpu_gemm_policy(policy): "auto", "float32" or "input" (cpu_isa.h set_gemm_policy), for
// tests and benchmarks; returns the previous policy.
static PyObject* cpu_gemm_dtype(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const std::string dtype = name;
  const c10::ScalarType type = dtype == "float32" ? c10::kFloat
                               : dtype == "bfloat16" ? c10::kBFloat16
                               : dtype == "float16" ? c10::kHalf
                                                    : c10::ScalarType::Undefined;
  if (type == c10::ScalarType::Undefined) {
    PyErr_Format(PyExc_ValueError, "cpu_gemm_dtype: expected 'float32', 'bfloat16' or 'float16', got '%s'", name);
    return nullptr;
  }
  const c10::ScalarType gemm = superexperts::cpu::gemm_dtype(type);
  return PyUnicode_FromString(gemm == c10::kFloat ? "float32" : dtype.c_str());
}

static PyObject* set_cpu_gemm_policy(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const std::string previous = superexperts::cpu::gemm_policy();
  try {
    superexperts::cpu::set_gemm_policy(name);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  return PyUnicode_FromString(previous.c_str());
}

static PyMethodDef native_methods[] = {
    {"cpu_gemm_dtype", cpu_gemm_dtype, METH_O, "The dtype the CPU down projection's GEMMs run in for a dtype name."},
    {"set_cpu_gemm_policy", set_cpu_gemm_policy, METH_O,
     "Set the CPU GEMM policy ('auto', 'float32' or 'input'); returns the previous one."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native",
                                    "Native kernels of superexperts_kernels (torch.ops.superexperts.*_native).",
                                    -1, native_methods};

PyMODINIT_FUNC PyInit__native() {
  PyObject* module = PyModule_Create(&native_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "WITH_CUDA", kWithCuda) < 0 ||
      PyModule_AddStringConstant(module, "CPU_CAPABILITY", superexperts::cpu::kernels().name) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
