// The effdense operators: the schemas of the five ops Python calls (defined once, here), their registration for
// the CPU and CUDA dispatch keys (one device-generic function each: block.cpp, steps.cpp), and the module
// `import effdense._C` loads. Their fake (meta) implementations and autograd formulas are registered in
// effdense/backends/cpp_backend.py; what they compute is in ops.h. The block driver's steps are plain C++
// functions (ops.h), not operators.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(effdense, m) {
  // sync_group/sync_size: --sync-bn's process group (its registered name and size; None: this process's
  // statistics only); sync_count: the pixels the forward's statistics spanned over every process (its `count`)
  m.def("transition_forward(Tensor x, Tensor gamma, Tensor beta, Tensor? running_mean, Tensor? running_var, "
        "float eps, Tensor weight, str? sync_group=None, int sync_size=0) -> (Tensor y, Tensor mean, Tensor var, "
        "Tensor count)");
  m.def("transition_backward(Tensor grad_y, Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor var, "
        "float eps, bool batch_stats, Tensor weight, str? sync_group=None, int sync_size=0, int sync_count=0) -> "
        "(Tensor grad_x, Tensor grad_gamma, Tensor grad_beta, Tensor grad_weight)");
  m.def("update_running_stats(Tensor(a!)[] running_mean, Tensor(b!)[] running_var, "
        "Tensor(c!)[] num_batches_tracked, Tensor mean, Tensor var, int[] rows, float[] momentum, int count) -> ()");
  m.def("dense_block_forward(Tensor x, Tensor[] w1, Tensor[] w2, Tensor[] gamma1, Tensor[] beta1, "
        "Tensor[] gamma2, Tensor[] beta2, Tensor?[] running_mean1, Tensor?[] running_var1, "
        "Tensor?[] running_mean2, Tensor?[] running_var2, float[] eps1, float[] eps2, float[] drop_rate, "
        "bool keep_bottleneck, bool reserve_backward, str? sync_group=None, int sync_size=0) -> (Tensor feat, "
        "Tensor mean, Tensor var, Tensor mean2, Tensor var2, Tensor drop_mask, Tensor bottleneck, Tensor count)");
  m.def("dense_block_backward(Tensor grad_out, Tensor feat, Tensor mean, Tensor var, Tensor mean2, "
        "Tensor var2, Tensor drop_mask, Tensor bottleneck, Tensor[] w1, Tensor[] w2, Tensor[] gamma1, "
        "Tensor[] beta1, Tensor[] gamma2, Tensor[] beta2, Tensor?[] running_mean1, Tensor?[] running_var1, "
        "Tensor?[] running_mean2, Tensor?[] running_var2, float[] eps1, float[] eps2, float[] drop_rate, "
        "str? sync_group=None, int sync_size=0, int sync_count=0) -> (Tensor grad_x, Tensor[] grad_w1, "
        "Tensor[] grad_w2, Tensor[] grad_gamma1, Tensor[] grad_beta1, Tensor[] grad_gamma2, Tensor[] grad_beta2)");
}

#define EFFDENSE_REGISTER(m)                                             \
  m.impl("transition_forward", &effdense::transition_forward);          \
  m.impl("transition_backward", &effdense::transition_backward);        \
  m.impl("update_running_stats", &effdense::update_running_stats);      \
  m.impl("dense_block_forward", &effdense::dense_block_forward);        \
  m.impl("dense_block_backward", &effdense::dense_block_backward)

TORCH_LIBRARY_IMPL(effdense, CPU, m) { EFFDENSE_REGISTER(m); }

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(effdense, CUDA, m) { EFFDENSE_REGISTER(m); }
#endif

namespace effdense {
void add_testing_module(PyObject* parent);  // testing.cpp
}

// `import effdense._C` loads this library, whose static initializers register the ops above. Its functions report
// and release the CPU block driver's workspace and say which 3x3 convolutions it runs; effdense._C._testing
// (testing.cpp) exposes the steps to the tests.
namespace {
PyObject* py_workspace_bytes(PyObject*, PyObject*) { return PyLong_FromLongLong(effdense::workspace_bytes()); }
PyObject* py_release_workspace(PyObject*, PyObject*) {
  effdense::release_workspace();
  Py_RETURN_NONE;
}
PyObject* py_cpu_conv3x3(PyObject*, PyObject*) { return PyBool_FromLong(effdense::cpu_conv3x3_enabled()); }
PyMethodDef methods[] = {
    {"workspace_bytes", py_workspace_bytes, METH_NOARGS,
     "Bytes of CPU scratch memory the cpp backend's block driver holds for reuse across layers and steps."},
    {"release_workspace", py_release_workspace, METH_NOARGS,
     "Free that scratch memory (the next block call allocates it again)."},
    {"cpu_conv3x3", py_cpu_conv3x3, METH_NOARGS,
     "Whether the CPU block driver runs bottleneck 3x3 convolutions on effdense's own kernels (AVX2 build, "
     "EFFDENSE_CPU_CONV unset) rather than on ATen's."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "effdense's C++/CUDA operators (torch.ops.effdense)",
                                   -1, methods, nullptr, nullptr, nullptr, nullptr};
  PyObject* module = PyModule_Create(&def);
  if (module == nullptr) return nullptr;
  try {
    effdense::add_testing_module(module);
  } catch (const std::exception& e) {
    Py_DECREF(module);
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  return module;
}
