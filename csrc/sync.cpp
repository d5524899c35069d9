// --sync-bn's collectives and merge (sync.h).
#include "sync.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <algorithm>

#include "cpu/kernels.h"

namespace effdense {
namespace {

// A _c10d_functional op called boxed (its group argument is `str` in some PyTorch versions, `Any` in others).
at::Tensor collective(const char* name, std::vector<c10::IValue> args) {
  const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  op.callBoxed(&args);
  at::Tensor out = args.at(0).toTensor();
  args = {out};
  static const c10::OperatorHandle wait =
      c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::wait_tensor", "");
  wait.callBoxed(&args);
  return args.at(0).toTensor();
}

at::Tensor all_gather(const Sync& sync, const at::Tensor& t) {  // [size * t.numel()], rank r's at r * t.numel()
  return collective("_c10d_functional::all_gather_into_tensor", {t, sync.size, sync.group});
}

}  // namespace

std::optional<Sync> make_sync(const std::optional<std::string>& group, int64_t size, int64_t count,
                              const at::Tensor& like, const char* op) {
  if (!group) return std::nullopt;
  TORCH_CHECK(like.is_cpu(), "effdense::", op, ": cross-process batch statistics (sync_group) are implemented for "
              "CPU tensors (gloo) only, got ", like.device());
  TORCH_CHECK(size >= 1 && count >= 0, "effdense::", op, ": expected sync_size >= 1 (the processes of group ", *group,
              ") and sync_count >= 0, got ", size, " and ", count);
  return Sync{*group, size, count};
}

at::Tensor count_tensor(const Sync* sync, int64_t count) {
  const auto opts = at::TensorOptions().dtype(at::kLong);
  return sync ? at::full({1}, count, opts) : at::empty({0}, opts);
}

int64_t merge_stats(const Sync& sync, const at::Tensor& mean, const at::Tensor& var, int64_t count) {
  const int64_t C = mean.numel();
  // (count, mean, M2 = var * count) in double (exact counts), zeros from a process without pixels (its statistics
  // are NaN; it adds nothing to the merge)
  at::Tensor local = at::zeros({1 + 2 * C}, mean.options().dtype(at::kDouble));
  if (count > 0) {
    local[0].fill_(static_cast<double>(count));
    local.narrow(0, 1, C).copy_(mean);
    local.narrow(0, 1 + C, C).copy_(var).mul_(static_cast<double>(count));
  }
  const at::Tensor gathered = all_gather(sync, local).view({sync.size, 1 + 2 * C});
  cpu::merge_moments(gathered, mean, var);
  double total = 0;
  const double* g = gathered.const_data_ptr<double>();
  for (int64_t r = 0; r < sync.size; ++r) total += g[r * (1 + 2 * C)];
  return static_cast<int64_t>(total);
}

void sum_over_processes(const Sync& sync, std::vector<double>& dgamma, std::vector<double>& dbeta) {
  const int64_t C = static_cast<int64_t>(dgamma.size());
  at::Tensor t = at::empty({2 * C}, at::TensorOptions().dtype(at::kDouble));
  std::copy(dgamma.begin(), dgamma.end(), t.data_ptr<double>());
  std::copy(dbeta.begin(), dbeta.end(), t.data_ptr<double>() + C);
  const at::Tensor sum = collective("_c10d_functional::all_reduce", {t, std::string("sum"), sync.group});
  const double* p = sum.const_data_ptr<double>();
  std::copy(p, p + C, dgamma.begin());
  std::copy(p + C, p + 2 * C, dbeta.begin());
}

}  // namespace effdense
