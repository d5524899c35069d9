// effdense._C._testing: the block driver's steps (ops.h) callable from Python, for the unit tests
// (tests/csrc/test_cpp_ops.py) and the kernel benchmarks (benchmarks/suites.py). NOT an API: no schema, no fake,
// no autograd, no torch.compile support; the arguments are those of ops.h, in its order, optional tensors None.
// The steps check their arguments and pick the device as the block driver's calls do.
#include <torch/python.h>

#include "ops.h"

namespace effdense {
namespace {

namespace py = pybind11;

// merge_stats on a Sync of the given group (sync.h), for the --sync-bn tests of the merge itself
int64_t merge_stats_py(const std::string& group, int64_t size, const at::Tensor& mean, const at::Tensor& var,
                       int64_t count) {
  return merge_stats(Sync{group, size, 0}, mean, var, count);
}

}  // namespace

void add_testing_module(PyObject* parent) {
  py::module_ m = py::reinterpret_borrow<py::module_>(parent).def_submodule(
      "_testing", "The cpp backend's C++ steps, for effdense's tests and benchmarks only (not an API): see "
                  "csrc/ops.h for what each computes.");
  const py::none none;
  m.def("channel_stats", &channel_stats, py::arg("x"));
  m.def("bn_relu_into", &bn_relu_into, py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("out"));
  m.def("bn_relu_backward_into", [](const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale,
                                    const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& invstd,
                                    bool batch_stats, const at::Tensor& gx, bool accumulate) {
    return bn_relu_backward_into(x, gy, scale, shift, mean, invstd, batch_stats, gx, accumulate);
  });
  m.def("bn_relu_conv1x1", &bn_relu_conv1x1);
  m.def("bn_scale_shift", &bn_scale_shift);
  m.def("batch_norm_relu_into", &batch_norm_relu_into);
  m.def("bn_relu_linear_into", &bn_relu_linear_into, py::arg("x"), py::arg("gamma"), py::arg("beta"),
        py::arg("mean"), py::arg("var"), py::arg("eps"), py::arg("weight"), py::arg("out"),
        py::arg("out_mean") = none, py::arg("out_var") = none);
  m.def("bn_relu_conv3x3_into", &bn_relu_conv3x3_into, py::arg("x"), py::arg("gamma"), py::arg("beta"),
        py::arg("mean"), py::arg("var"), py::arg("eps"), py::arg("weight"), py::arg("out"),
        py::arg("out_mean") = none, py::arg("out_var") = none);
  m.def("bn_relu_conv3x3_backward", &bn_relu_conv3x3_backward);
  m.def("batch_norm_relu_backward_into",
        [](const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma, const at::Tensor& beta,
           const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats, const at::Tensor& gx,
           bool accumulate, const OptTensor& coef) {
          return batch_norm_relu_backward_into(x, gy, gamma, beta, mean, var, eps, batch_stats, gx, accumulate, coef);
        },
        py::arg("x"), py::arg("grad_y"), py::arg("gamma"), py::arg("beta"), py::arg("mean"), py::arg("var"),
        py::arg("eps"), py::arg("batch_stats"), py::arg("grad_x"), py::arg("accumulate"), py::arg("grad_coef") = none);
  m.def("bn_relu_linear_backward",
        [](const at::Tensor& x, const at::Tensor& gz, const at::Tensor& w, const at::Tensor& gamma,
           const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var, double eps, bool batch_stats,
           const at::Tensor& gx, bool accumulate, const OptTensor& coef) {
          return bn_relu_linear_backward(x, gz, w, gamma, beta, mean, var, eps, batch_stats, gx, accumulate, coef);
        },
        py::arg("x"), py::arg("grad_z"), py::arg("weight"), py::arg("gamma"), py::arg("beta"), py::arg("mean"),
        py::arg("var"), py::arg("eps"), py::arg("batch_stats"), py::arg("grad_x"), py::arg("accumulate"),
        py::arg("grad_coef") = none);
  m.def("bottleneck_backward",
        [](const at::Tensor& x, const at::Tensor& z, const at::Tensor& ga, const at::Tensor& w,
           const at::Tensor& gamma1, const at::Tensor& beta1, const at::Tensor& mean1, const at::Tensor& var1,
           double eps1, bool bs1, const at::Tensor& gamma2, const at::Tensor& beta2, const at::Tensor& mean2,
           const at::Tensor& var2, double eps2, bool bs2, const at::Tensor& gx, const OptTensor& coef) {
          return bottleneck_backward(x, z, ga, w, gamma1, beta1, mean1, var1, eps1, bs1, gamma2, beta2, mean2, var2,
                                     eps2, bs2, gx, coef);
        },
        py::arg("x"), py::arg("z"), py::arg("grad_a"), py::arg("weight"), py::arg("gamma1"), py::arg("beta1"),
        py::arg("mean1"), py::arg("var1"), py::arg("eps1"), py::arg("batch_stats1"), py::arg("gamma2"),
        py::arg("beta2"), py::arg("mean2"), py::arg("var2"), py::arg("eps2"), py::arg("batch_stats2"),
        py::arg("grad_x"), py::arg("grad_coef") = none);
  m.def("store_channels", &store_channels, py::arg("y"), py::arg("noise"), py::arg("p"), py::arg("out"),
        py::arg("mask"), py::arg("out_mean") = none, py::arg("out_var") = none);
  m.def("gather_grad", &gather_grad, py::arg("grad"), py::arg("mask"), py::arg("p"), py::arg("out"),
        py::arg("x") = none, py::arg("coef") = none, py::arg("mean") = none);
  m.def("merge_stats", &merge_stats_py, py::arg("group"), py::arg("size"), py::arg("mean"), py::arg("var"),
        py::arg("count"));
}

}  // namespace effdense
