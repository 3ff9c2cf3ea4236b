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

#ifdef CPU_CAPABILITY_AVX2
constexpr const char* kCpuCapability = "avx2";
#else
constexpr const char* kCpuCapability = "default";
#endif

static PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native",
                                    "Native kernels of superexperts_kernels (torch.ops.superexperts.*_native).",
                                    -1, nullptr};

PyMODINIT_FUNC PyInit__native() {
  PyObject* module = PyModule_Create(&native_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "WITH_CUDA", kWithCuda) < 0 ||
      PyModule_AddStringConstant(module, "CPU_CAPABILITY", kCpuCapability) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
