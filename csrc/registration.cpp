// Schemas of the mftk:: ops and their CPU kernels. weight may be None: the adapters alone (a
// base computed elsewhere, e.g. a 4-bit layer, is added by the caller). Fake (meta) kernels and
// autograd are registered from Python (mftk/ops/registry.py); CUDA tensors use the Triton kernels
// in kernels/. Only torch/library.h and Python.h here: no pybind11, no torch/extension.h.
#include <Python.h>
#include <torch/library.h>

#include "mftk.h"

TORCH_LIBRARY(mftk, m) {
  m.def("parallel_threads() -> int", &mftk::parallel_threads_cpu);
  m.def("build_plan(Tensor task_ids, int num_tasks) -> (Tensor perm, Tensor offsets)");
  m.def(
      "hard_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "Tensor scaling, Tensor perm, Tensor offsets) -> (Tensor y, Tensor shrink)");
  m.def(
      "hard_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor lora_a, Tensor lora_b, "
      "Tensor scaling, Tensor perm, Tensor offsets, Tensor shrink) "
      "-> (Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b)");
  m.def(
      "soft_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "Tensor scaling, Tensor router_weight, Tensor? router_bias, float temperature, int top_k) "
      "-> (Tensor y, Tensor logits, Tensor probs, Tensor shrink)");
  m.def(
      "soft_bwd(Tensor grad_y, Tensor? grad_logits, Tensor x, Tensor? weight, Tensor lora_a, "
      "Tensor lora_b, Tensor scaling, Tensor router_weight, Tensor probs, Tensor shrink, "
      "float temperature) -> (Tensor grad_x, Tensor grad_lora_a, Tensor grad_lora_b, "
      "Tensor grad_router_weight, Tensor grad_router_bias)");
}

TORCH_LIBRARY_IMPL(mftk, CPU, m) {
  m.impl("build_plan", &mftk::build_plan_cpu);
  m.impl("hard_fwd", &mftk::hard_fwd_cpu);
  m.impl("hard_bwd", &mftk::hard_bwd_cpu);
  m.impl("soft_fwd", &mftk::soft_fwd_cpu);
  m.impl("soft_bwd", &mftk::soft_bwd_cpu);
}

// Importing mftk._C runs the static registrations above; the module has no functions of its own.
#define MFTK_PYINIT_(name) PyInit_##name
#define MFTK_PYINIT(name) MFTK_PYINIT_(name)
PyMODINIT_FUNC MFTK_PYINIT(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "mftk._C", "mftk CPU ops (torch.ops.mftk.*)", -1,
                            nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
