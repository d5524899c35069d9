// --sync-bn in the C++ ops: batch statistics over every process of a c10d process group, as nn.SyncBatchNorm
// computes them (effdense/backends/bn.py sync_channel_stats / sync_grad_sums is the Python specification).
//
// Forward: wherever a kernel has produced this process's per-channel (mean, biased var) over its `count` pixels,
// merge_stats replaces them by those of every process's pixels: (count, mean, M2 = var * count) all-gathered and
// merged with Chan et al.'s formula (bn_math.h Moments; a process with no pixels adds nothing but takes part in
// every collective, or the others would wait for it). Backward: the BN backward's per-channel sums (dbeta, dgamma)
// are summed over the processes before the batch-statistics correction uses them, over the total pixel count
// (from the forward); the parameter gradients stay this process's (DDP averages them).
//
// The collectives are the _c10d_functional ops (all_gather_into_tensor, all_reduce, wait_tensor) called through
// the dispatcher by the group's registered name (gloo). CPU tensors only for now: the CUDA steps would need their
// reductions split around the collective (see cuda/block_ops.cpp), and nothing here could test them.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace effdense {

struct Sync {
  std::string group;  // the process group's registered name (ProcessGroup.group_name)
  int64_t size = 0;   // its number of processes
  int64_t count = 0;  // backward: the pixels the forward's statistics spanned over every process
};

// The ops' optional arguments (group name, size, total count) as a Sync, or nullopt (no name: this process only).
// CPU tensors only (`like`: the op's input): the CUDA kernels do not take part in collectives yet.
std::optional<Sync> make_sync(const std::optional<std::string>& group, int64_t size, int64_t count,
                              const at::Tensor& like, const char* op);

// mean/var [C] (float or double, CPU): this process's statistics over `count` pixels, overwritten with those of
// every process. Returns the pixels of every process.
int64_t merge_stats(const Sync& sync, const at::Tensor& mean, const at::Tensor& var, int64_t count);

// What the forward ops return as `count`: the pixels their statistics span over every process, [1] int64 on the
// CPU, with a Sync (the Python side's running-statistics update needs it); empty [0] without.
at::Tensor count_tensor(const Sync* sync, int64_t count);

// dgamma and dbeta (the CPU kernels' double sums), summed over every process, in place.
void sum_over_processes(const Sync& sync, std::vector<double>& dgamma, std::vector<double>& dbeta);

}  // namespace effdense
