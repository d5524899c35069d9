// The argument checks of the effdense steps and ops (checks.h): one function per op, shared by its CPU and CUDA
// kernels, built from the few helpers at the top. Messages name the op, the argument and what was expected.
#include "checks.h"

#include <string>

namespace effdense {

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

namespace {

std::string describe(const at::Tensor& t) {  // "shape [..] with dtype .. on .."
  return t.defined() ? "shape " + shape_str(t) + " with dtype " + c10::toString(t.scalar_type()) + " on " +
                           t.device().str()
                     : std::string("an undefined tensor");
}

// v [C] (one value per channel of x) of dtype `dtype` on x's device
void check_vec(const at::Tensor& v, const at::Tensor& x, at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK(v.defined() && v.dim() == 1 && v.size(0) == x.size(1) && v.scalar_type() == dtype &&
                  v.device() == x.device(),
              "effdense::", op, ": expected ", name, " of shape [", x.size(1), "] (one value per channel of x ",
              shape_str(x), ") with dtype ", dtype, " on ", x.device(), ", got ", describe(v));
}

// scale/shift [C] in x's accumulation dtype
void check_scale_shift_of(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const char* op) {
  check_feature(x, op);
  const auto a = acc_type(x.scalar_type());
  check_vec(scale, x, a, op, "scale");
  check_vec(shift, x, a, op, "shift");
}

// a BN over x's channels given as (gamma, beta, mean, var): [C] vectors of any floating dtype on x's device
void check_bn_params(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                     const at::Tensor& var, const char* op) {
  const char* names[] = {"gamma", "beta", "mean", "var"};
  const at::Tensor* ts[] = {&gamma, &beta, &mean, &var};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& v = *ts[i];
    TORCH_CHECK(v.defined() && v.dim() == 1 && v.size(0) == x.size(1) && is_float_type(v.scalar_type()) &&
                    v.device() == x.device(),
                "effdense::", op, ": expected ", names[i], " of shape [", x.size(1), "] (one value per channel of x ",
                shape_str(x), ") with a floating dtype on ", x.device(), ", got ", describe(v));
  }
}

// an output of `shape` in x's dtype (or, acc_ok, its accumulation dtype) on x's device
void check_out(const at::Tensor& out, at::IntArrayRef shape, const at::Tensor& x, bool acc_ok, const char* op,
               const char* name) {
  const auto dt = x.scalar_type(), a = acc_type(dt);
  TORCH_CHECK(out.defined() && out.sizes() == shape && out.device() == x.device() &&
                  (out.scalar_type() == dt || (acc_ok && out.scalar_type() == a)),
              "effdense::", op, ": expected ", name, " of shape ", shape, " with dtype ", dt,
              acc_ok ? std::string(" (that of x) or ") + c10::toString(a) : std::string(" (that of x)"), " on ",
              x.device(), ", got ", describe(out));
}

// optional statistics outputs [n] in x's accumulation dtype, both or neither
void check_stats_out(const OptTensor& mean, const OptTensor& var, int64_t n, const at::Tensor& x, const char* op) {
  TORCH_CHECK(mean.has_value() == var.has_value(), "effdense::", op, ": expected out_mean and out_var both given "
              "or both None");
  if (!mean) return;
  const auto a = acc_type(x.scalar_type());
  for (const at::Tensor* t : {&*mean, &*var})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == a && t->device() == x.device(),
                "effdense::", op, ": expected out_mean and out_var of shape [", n, "] with dtype ", a, " on ",
                x.device(), ", got ", describe(*t));
}

// w [out, C, ks, ks] for x [N, C, H, W] in x's dtype ("out" names the output channels: B for the 1x1, k for the 3x3)
void check_kernel_weight(const at::Tensor& x, const at::Tensor& w, int64_t ks, const char* out, const char* op) {
  TORCH_CHECK(w.defined() && w.dim() == 4 && w.size(1) == x.size(1) && w.size(2) == ks && w.size(3) == ks &&
                  w.scalar_type() == x.scalar_type() && w.device() == x.device(),
              "effdense::", op, ": expected weight of shape [", out, ", ", x.size(1), ", ", ks, ", ", ks,
              "] with dtype ", x.scalar_type(), " (that of x) on ", x.device(), ", got ",
              w.defined() ? shape_str(w) : std::string("undefined"),
              w.defined() ? std::string(" with dtype ") + c10::toString(w.scalar_type()) + " on " + w.device().str()
                          : std::string());
}

void check_bn_conv(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                   const at::Tensor& var, const at::Tensor& w, int64_t ks, const char* op) {
  check_feature(x, op);
  check_bn_params(x, gamma, beta, mean, var, op);
  check_kernel_weight(x, w, ks, ks == 1 ? "B" : "k", op);
}

std::vector<int64_t> out_shape(const at::Tensor& x, const at::Tensor& w) {  // x's [N, ., H, W] with w's outputs
  return {x.size(0), w.size(0), x.size(2), x.size(3)};
}

void check_dropout(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "effdense::", op, ": expected p in [0, 1), got ", p);
}

}  // namespace

void check_feature(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.defined(), "effdense::", op, ": expected ", name, " to be a tensor, got an undefined tensor");
  TORCH_CHECK(x.dim() == 4, "effdense::", op, ": expected ", name, " to be a 4-D tensor [N, C, H, W], got a ",
              x.dim(), "-D tensor of shape ", shape_str(x));
  TORCH_CHECK(is_float_type(x.scalar_type()), "effdense::", op, ": expected ", name,
              " with dtype float32, float64, float16 or bfloat16, got ", x.scalar_type());
#ifdef WITH_CUDA
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), "effdense::", op, ": expected ", name, " on cpu or cuda, got ", x.device());
#else
  TORCH_CHECK(x.is_cpu(), "effdense::", op, ": expected ", name, " on cpu (effdense._C was built without its CUDA "
              "kernels), got ", x.device());
#endif
}

void check_same_shape(const at::Tensor& a, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(a.defined() && a.sizes() == x.sizes() && a.device() == x.device(), "effdense::", op, ": expected ",
              name, " of shape ", shape_str(x), " on ", x.device(), " (the shape of x), got ",
              a.defined() ? "shape " + shape_str(a) + " on " + a.device().str() : std::string("an undefined tensor"));
  TORCH_CHECK(is_float_type(a.scalar_type()), "effdense::", op, ": expected ", name,
              " with dtype float32, float64, float16 or bfloat16, got ", a.scalar_type());
}

void check_coef(const OptTensor& coef, const at::Tensor& x, const char* op) {
  TORCH_CHECK(!coef || (coef->dim() == 2 && coef->size(0) == 2 && coef->size(1) == x.size(1) &&
                        coef->scalar_type() == acc_type(x.scalar_type()) && coef->device() == x.device()),
              "effdense::", op, ": expected grad_coef of shape [2, ", x.size(1), "] with dtype ",
              acc_type(x.scalar_type()), " on ", x.device(), ", got ", coef ? describe(*coef) : std::string());
}

// ------------------------------------------------------------------------------------------------ the steps

void check_channel_stats(const at::Tensor& x) { check_feature(x, "channel_stats"); }

void check_bn_relu_into(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                        const at::Tensor& out) {
  const char* op = "bn_relu_into";
  check_scale_shift_of(x, scale, shift, op);
  check_same_shape(out, x, op, "out");
  check_out(out, x.sizes(), x, true, op, "out");
}

void check_bn_relu_backward_into(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& scale,
                                 const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& invstd,
                                 const at::Tensor& gx) {
  const char* op = "bn_relu_backward_into";
  check_scale_shift_of(x, scale, shift, op);
  check_same_shape(gy, x, op, "grad_y");
  TORCH_CHECK(gy.scalar_type() == x.scalar_type(), "effdense::", op, ": expected grad_y with dtype ",
              x.scalar_type(), " (that of x), got ", gy.scalar_type());
  const auto a = acc_type(x.scalar_type());
  check_vec(mean, x, a, op, "mean");
  check_vec(invstd, x, a, op, "invstd");
  check_same_shape(gx, x, op, "grad_x");
  check_out(gx, x.sizes(), x, true, op, "grad_x");
}

void check_bn_relu_conv1x1(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& w) {
  const char* op = "bn_relu_conv1x1";
  check_scale_shift_of(x, scale, shift, op);
  check_kernel_weight(x, w, 1, "B", op);
}

void check_bn_scale_shift(const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                          const at::Tensor& var, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "effdense::bn_scale_shift: expected dtype float32 or "
              "float64, got ", dtype);
  TORCH_CHECK(mean.dim() == 1 && is_float_type(mean.scalar_type()), "effdense::bn_scale_shift: expected mean 1-D "
              "with a floating dtype, got ", describe(mean));
  for (const at::Tensor* t : {&gamma, &beta, &var})
    TORCH_CHECK(t->dim() == 1 && t->numel() == mean.numel() && t->device() == mean.device() &&
                    is_float_type(t->scalar_type()),
                "effdense::bn_scale_shift: expected gamma, beta and var of shape [", mean.numel(), "] (that of mean) "
                "with a floating dtype on ", mean.device(), ", got ", describe(*t));
}

void check_batch_norm_relu_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                const at::Tensor& mean, const at::Tensor& var, const at::Tensor& out) {
  const char* op = "batch_norm_relu_into";
  check_feature(x, op);
  check_bn_params(x, gamma, beta, mean, var, op);
  check_out(out, x.sizes(), x, true, op, "out");
}

void check_bn_relu_linear_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                               const at::Tensor& mean, const at::Tensor& var, const at::Tensor& w,
                               const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var) {
  const char* op = "bn_relu_linear_into";
  check_bn_conv(x, gamma, beta, mean, var, w, 1, op);
  check_out(out, out_shape(x, w), x, false, op, "out");
  check_stats_out(out_mean, out_var, w.size(0), x, op);
}

void check_bn_relu_conv3x3_into(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                const at::Tensor& mean, const at::Tensor& var, const at::Tensor& w,
                                const at::Tensor& out, const OptTensor& out_mean, const OptTensor& out_var) {
  const char* op = "bn_relu_conv3x3_into";
  check_bn_conv(x, gamma, beta, mean, var, w, 3, op);
  check_out(out, out_shape(x, w), x, false, op, "out");
  check_stats_out(out_mean, out_var, w.size(0), x, op);
}

void check_bn_relu_conv3x3_backward(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                    const at::Tensor& w, const at::Tensor& ga) {
  const char* op = "bn_relu_conv3x3_backward";
  check_bn_conv(x, gamma, beta, mean, var, w, 3, op);
  check_out(gy, out_shape(x, w), x, false, op, "grad_y");
  check_out(ga, x.sizes(), x, false, op, "grad_a");
}

void check_batch_norm_relu_backward_into(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& gamma,
                                         const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                         const at::Tensor& gx, const OptTensor& coef) {
  const char* op = "batch_norm_relu_backward_into";
  check_feature(x, op);
  check_bn_params(x, gamma, beta, mean, var, op);
  check_out(gy, x.sizes(), x, false, op, "grad_y");
  check_out(gx, x.sizes(), x, true, op, "grad_x");
  check_coef(coef, x, op);
}

void check_bn_relu_linear_backward(const at::Tensor& x, const at::Tensor& gz, const at::Tensor& w,
                                   const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                   const at::Tensor& var, const at::Tensor& gx, const OptTensor& coef) {
  const char* op = "bn_relu_linear_backward";
  check_bn_conv(x, gamma, beta, mean, var, w, 1, op);
  check_coef(coef, x, op);
  check_out(gz, out_shape(x, w), x, false, op, "grad_z");
  check_out(gx, x.sizes(), x, true, op, "grad_x");
}

void check_bottleneck_backward(const at::Tensor& x, const at::Tensor& z, const at::Tensor& ga, const at::Tensor& w,
                               const at::Tensor& gamma1, const at::Tensor& beta1, const at::Tensor& mean1,
                               const at::Tensor& var1, const at::Tensor& gamma2, const at::Tensor& beta2,
                               const at::Tensor& mean2, const at::Tensor& var2, const at::Tensor& gx,
                               const OptTensor& coef) {
  const char* op = "bottleneck_backward";
  check_bn_conv(x, gamma1, beta1, mean1, var1, w, 1, op);
  check_coef(coef, x, op);
  check_out(z, out_shape(x, w), x, false, op, "z");
  check_out(ga, z.sizes(), x, false, op, "grad_a");
  check_bn_params(z, gamma2, beta2, mean2, var2, op);
  check_out(gx, x.sizes(), x, true, op, "grad_x");
}

void check_store_channels(const at::Tensor& y, const OptTensor& noise, double p, const at::Tensor& out,
                          const OptTensor& mask, const OptTensor& out_mean, const OptTensor& out_var) {
  const char* op = "store_channels";
  check_feature(y, op, "y");
  check_out(out, y.sizes(), y, false, op, "out");
  if (noise) check_out(*noise, y.sizes(), y, false, op, "noise");
  TORCH_CHECK(!mask || (noise && mask->sizes() == y.sizes() && mask->scalar_type() == at::kBool &&
                        mask->device() == y.device()),
              "effdense::store_channels: expected mask (given only with noise) of shape ", shape_str(y),
              " with dtype bool on ", y.device());
  check_dropout(p, op);
  check_stats_out(out_mean, out_var, y.size(1), y, op);
}

void check_gather_grad(const at::Tensor& g, const OptTensor& mask, double p, const at::Tensor& out,
                       const OptTensor& x, const OptTensor& coef, const OptTensor& mean) {
  const char* op = "gather_grad";
  check_feature(out, op, "out");
  TORCH_CHECK(g.defined() && g.sizes() == out.sizes() && g.device() == out.device() &&
                  (g.scalar_type() == out.scalar_type() || g.scalar_type() == acc_type(out.scalar_type())),
              "effdense::gather_grad: expected grad of shape ", shape_str(out), " with dtype ", out.scalar_type(),
              " or ", acc_type(out.scalar_type()), " (that of out or its accumulation dtype) on ", out.device());
  TORCH_CHECK(!mask || (mask->sizes() == out.sizes() && mask->scalar_type() == at::kBool &&
                        mask->device() == out.device()),
              "effdense::gather_grad: expected mask of shape ", shape_str(out), " with dtype bool on ", out.device());
  check_dropout(p, op);
  TORCH_CHECK(x.has_value() == coef.has_value() && x.has_value() == mean.has_value(), "effdense::gather_grad: "
              "expected x, coef and mean all given (deferred BN corrections) or all None");
  if (!x) return;
  TORCH_CHECK(x->sizes() == out.sizes() && x->scalar_type() == out.scalar_type() && x->device() == out.device(),
              "effdense::gather_grad: expected x of shape ", shape_str(out), " with dtype ", out.scalar_type(),
              " (those of out) on ", out.device());
  check_coef(coef, out, op);
  TORCH_CHECK(mean->dim() == 1 && mean->size(0) == out.size(1) && is_float_type(mean->scalar_type()) &&
                  mean->device() == out.device(),
              "effdense::gather_grad: expected mean of shape [", out.size(1), "] with a floating dtype on ",
              out.device(), ", got ", describe(*mean));
}

// ------------------------------------------------------------------------------------- the registered ops

namespace {
void check_transition(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                      const at::Tensor& var, const at::Tensor& w, const char* op) {
  check_bn_conv(x, gamma, beta, mean, var, w, 1, op);
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "effdense::", op, ": expected x with H and W of at least 2 (a 2x2 "
              "average pool), got shape ", shape_str(x));
}
}  // namespace

void check_transition_forward(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                              const OptTensor& running_mean, const OptTensor& running_var, const at::Tensor& w) {
  const char* op = "transition_forward";
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), "effdense::", op, ": expected running_mean and "
              "running_var both given (running statistics) or both None (batch statistics)");
  check_transition(x, gamma, beta, running_mean ? *running_mean : gamma, running_var ? *running_var : gamma, w, op);
  TORCH_CHECK(running_mean || x.size(0) * x.size(2) * x.size(3) != 1, "Expected more than 1 value per channel when "
              "training, got input size ", x.sizes());
}

void check_transition_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& gamma,
                               const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                               const at::Tensor& w) {
  const char* op = "transition_backward";
  check_transition(x, gamma, beta, mean, var, w, op);
  check_out(gy, {x.size(0), w.size(0), x.size(2) / 2, x.size(3) / 2}, x, false, op, "grad_y");
}

void check_update_running_stats(at::TensorList running_mean, at::TensorList running_var, at::TensorList nbt,
                                const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef rows,
                                at::ArrayRef<double> momentum) {
  const char* op = "effdense::update_running_stats";
  const size_t L = running_mean.size();
  TORCH_CHECK(running_var.size() == L && nbt.size() == L && rows.size() == L && momentum.size() == L, op,
              ": expected running_var, num_batches_tracked, rows and momentum of length ", L, " (that of "
              "running_mean), got ", running_var.size(), ", ", nbt.size(), ", ", rows.size(), ", ", momentum.size());
  TORCH_CHECK(mean.dim() == 1 || mean.dim() == 2, op, ": expected mean of shape [C] or [L, B], got ",
              shape_str(mean));
  TORCH_CHECK(var.sizes() == mean.sizes() && var.strides() == mean.strides() &&
                  var.scalar_type() == mean.scalar_type() && var.device() == mean.device() &&
                  (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble),
              op, ": expected mean and var of one shape, strides and device with dtype float32 or float64 (the batch "
              "statistics' accumulation dtype), got ", describe(mean), " and ", describe(var));
  for (size_t i = 0; i < L; ++i) {
    const at::Tensor &rm = running_mean[i], &rv = running_var[i];
    const int64_t c = rm.numel();
    TORCH_CHECK(rm.dim() == 1 && rv.dim() == 1 && rv.numel() == c && is_float_type(rm.scalar_type()) &&
                    rv.scalar_type() == rm.scalar_type() && rm.scalar_type() == running_mean[0].scalar_type() &&
                    rm.device() == mean.device() && rv.device() == mean.device(),
                op, ": expected running_mean[", i, "] and running_var[", i, "] 1-D of equal length on ",
                mean.device(), " with the floating dtype of running_mean[0], got ", describe(rm), " and ",
                describe(rv));
    TORCH_CHECK(nbt[i].numel() == 1 && nbt[i].scalar_type() == at::kLong && nbt[i].device() == mean.device(), op,
                ": expected num_batches_tracked[", i, "] a one-element int64 tensor on ", mean.device());
    if (mean.dim() == 1) {
      TORCH_CHECK(c <= mean.size(0), op, ": running_mean[", i, "] has ", c, " channels, more than the ",
                  mean.size(0), " of mean");
    } else {
      TORCH_CHECK(rows[i] >= 0 && rows[i] < mean.size(0) && mean.size(1) == c, op, ": expected row ", rows[i],
                  " of mean ", shape_str(mean), " to hold ", c, " channels");
    }
  }
}

}  // namespace effdense
