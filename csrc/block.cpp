// The memory-efficient dense block of docs/DESIGN.md, forward and backward, driven from C++.
//
// Device generic: every step is a plain call of ops.h (which checks its arguments and runs the CPU kernel of cpu/ or
// the CUDA one of cuda/) or an ATen convolution (oneDNN on CPU, cuDNN on GPU). Each step takes a BN as (gamma,
// beta, mean, var, eps) and derives scale/shift itself, writes its statistics straight into the block's statistics
// buffers and its results into caller-given buffers, so a layer is a fixed handful of launches and no host sync:
//   forward   bn_relu_linear_into (BN1-ReLU-conv1x1, with the statistics of z) | batch_norm_relu_into (plain)
//             -> batch_norm_relu_into (BN2-ReLU, in place) -> conv3x3 -> [bernoulli_] -> store_channels
//             (dropout, the store into F, the new channels' statistics)
//   backward  gather_grad -> [bn_relu_linear_into (recompute z)] -> batch_norm_relu_into (a) -> conv3x3 backward
//             -> bottleneck_backward (BN2-ReLU backward, then conv1's wgrad and dgrad and the BN1-ReLU backward
//             added into G)
// On CPU, BN2-ReLU and the 3x3 convolution (forward, and its backward) are one op each instead
// (bn_relu_conv3x3_into, bn_relu_conv3x3_backward: cpu/conv3x3.cpp), unless EFFDENSE_CPU_CONV=onednn; without
// dropout the forward op also stores into F and takes the new channels' statistics (no store_channels).
//
// Storage, as in effdense/backends/torch_backend.py (the executable specification):
//  * one feature buffer F [N, C0 + L*k, H, W] in the input's memory format; layer l reads the prefix
//    F[:, :c_l] (a view) and its k new channels are stored into F[:, c_l:c_l+k]; F is the block output.
//  * per-channel batch statistics (mean, biased var) of F, computed once when a channel is written and
//    reused by every later layer's norm1; per-layer statistics of the bottleneck for norm2.
//  * every transient is channels-last [P, width] whatever F's layout (a 1x1 convolution is then a GEMM on
//    it, and oneDNN's channels-last 3x3 convolutions are the faster ones): the bottleneck z (and a = BN2-ReLU(z)
//    in backward), the plain layers' BN-ReLU(F[:, :c]), the gradient gy of the new channels, and the
//    gradient buffer G (accumulation dtype, in F's layout, so the BN1 backward reads F and updates G in the same
//    tiles) that each layer, last to first, adds its input gradient into (G[:, :c_l] += ...). They are carved
//    from one workspace (Scratch below).
//  * with keep_bottleneck, each layer's bottleneck z kept from forward to backward ([L, N, H, W, B]: layer i's
//    a channels-last [N, B, H, W] view), so backward reads it instead of recomputing it: B*P per layer more
//    memory (still linear in depth), one BN-ReLU-GEMM per layer less. effdense.memory.bottleneck_plan chooses
//    the blocks where keeping it does not raise a training step's peak.
//  * dropout masks kept as bits (bool) of the k new channels per layer, linear in depth; the Bernoulli draw
//    is the one F.dropout makes (same generator, shape and layout), so masks agree with naive's.
// Running statistics are not touched here (the op is functional): effdense::update_running_stats does that
// once per forward, called by the Python backend.
// --sync-bn (sync_group given; sync.h): every batch statistic a step writes is merged over the processes before a
// later step reads it (the forward returns the pixel count they span), and the backward's BN sums are summed over
// them inside the steps that apply the batch-statistics correction.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/DeviceGuard.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <vector>

#include "checks.h"
#include "ops.h"
#include "sync.h"

namespace effdense {
namespace {

at::Tensor conv(const at::Tensor& x, const at::Tensor& w) {
  return at::convolution(x, w, std::nullopt, {1, 1}, {w.size(2) / 2, w.size(3) / 2}, {1, 1}, false, {0, 0}, 1);
}

// (grad input, grad weight); the weight gradient takes the weight's strides (cuDNN/oneDNN may return it
// channels-last), as the fake implementation promises.
std::tuple<at::Tensor, at::Tensor> conv_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w) {
  auto [gx, gw, gb] = at::convolution_backward(gy, x, w, std::nullopt, {1, 1}, {w.size(2) / 2, w.size(3) / 2},
                                               {1, 1}, false, {0, 0}, 1, {true, true, false});
  if (gw.strides() != w.strides()) gw = at::empty_like(w).copy_(gw);
  return {gx, gw};
}

// Whether a bottleneck's 3x3 convolution runs on the CPU kernels that take z and BN2 (cpu/conv3x3.cpp: BN2-ReLU
// fused into the convolution's input, a never stored) rather than on batch_norm_relu_into + ATen's.
bool own_conv3x3(const at::Tensor& z, const at::Tensor& w) {
  return z.is_cpu() && w.size(2) == 3 && w.size(3) == 3 && cpu_conv3x3_enabled();
}

bool fused_conv1x1_enabled() {
  const char* v = std::getenv("EFFDENSE_FUSED_CONV1X1");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Shapes, modes and argument checks of one block call.
struct Block {
  int64_t L = 0, N = 0, C0 = 0, H = 0, W = 0, k = 0, B = 0, C = 0;
  bool bottleneck = false;
  at::MemoryFormat mf = at::MemoryFormat::Contiguous;
  at::ScalarType cdt = at::kFloat, acc = at::kFloat;
  std::vector<bool> bs1, bs2;  // batch statistics (true) or running statistics (false), per layer

  int64_t width(int64_t i) const { return C0 + i * k; }
  int64_t pixels() const { return N * H * W; }
};

Block parse(const at::Tensor& x, int64_t C_total, at::TensorList w1, at::TensorList w2, at::TensorList g1,
            at::TensorList b1, at::TensorList g2, at::TensorList b2, const OptList& rm1, const OptList& rv1,
            const OptList& rm2, const OptList& rv2, at::ArrayRef<double> eps1, at::ArrayRef<double> eps2,
            at::ArrayRef<double> drop, const char* op) {
  Block b;
  check_feature(x, op, C_total < 0 ? "x" : "feat");
  b.L = static_cast<int64_t>(w1.size());
  TORCH_CHECK(b.L >= 1, "effdense::", op, ": expected w1 to hold one conv1 weight per layer (at least one), got 0");
  b.bottleneck = !w2.empty();
  const size_t L = static_cast<size_t>(b.L), L2 = b.bottleneck ? L : 0;
  TORCH_CHECK(g1.size() == L && b1.size() == L && rm1.size() == L && rv1.size() == L && eps1.size() == L &&
                  drop.size() == L,
              "effdense::", op, ": expected gamma1, beta1, running_mean1, running_var1, eps1 and drop_rate of "
              "length ", L, " (one per layer, as w1), got ", g1.size(), ", ", b1.size(), ", ", rm1.size(), ", ",
              rv1.size(), ", ", eps1.size(), ", ", drop.size());
  TORCH_CHECK(w2.size() == L2 && g2.size() == L2 && b2.size() == L2 && rm2.size() == L2 && rv2.size() == L2 &&
                  eps2.size() == L2,
              "effdense::", op, ": expected w2, gamma2, beta2, running_mean2, running_var2 and eps2 of length ",
              L2, " (", b.bottleneck ? "one per layer" : "none without a bottleneck", "), got ", w2.size(), ", ",
              g2.size(), ", ", b2.size(), ", ", rm2.size(), ", ", rv2.size(), ", ", eps2.size());
  b.cdt = x.scalar_type();
  b.acc = acc_type(b.cdt);
  b.N = x.size(0);
  b.H = x.size(2);
  b.W = x.size(3);
  b.k = b.bottleneck ? w2[0].size(0) : w1[0].size(0);
  b.B = b.bottleneck ? w1[0].size(0) : 0;
  b.C0 = C_total < 0 ? x.size(1) : C_total - b.L * b.k;
  b.C = b.C0 + b.L * b.k;
  TORCH_CHECK(b.C0 >= 1, "effdense::", op, ": feat has ", x.size(1), " channels, fewer than the ", b.L * b.k,
              " that ", b.L, " layers of growth rate ", b.k, " add");
  b.mf = out_format(x);
  auto check_w = [&](const at::Tensor& w, int64_t out, int64_t in, const char* name, size_t i, bool one) {
    TORCH_CHECK(w.dim() == 4 && w.size(0) == out && w.size(1) == in && w.size(2) % 2 == 1 && w.size(3) % 2 == 1 &&
                    (!one || (w.size(2) == 1 && w.size(3) == 1)) && w.scalar_type() == b.cdt &&
                    w.device() == x.device(),
                "effdense::", op, ": expected ", name, "[", i, "] of shape [", out, ", ", in,
                one ? ", 1, 1]" : ", kh, kw] (odd kh, kw)", " with dtype ", b.cdt, " (that of x) on ", x.device(),
                ", got shape ", shape_str(w), " with dtype ", w.scalar_type(), " on ", w.device());
  };
  auto check_v = [&](const at::Tensor& v, int64_t n, const char* name, size_t i) {
    TORCH_CHECK(v.dim() == 1 && v.size(0) == n && is_float_type(v.scalar_type()) && v.device() == x.device(),
                "effdense::", op, ": expected ", name, "[", i, "] of shape [", n, "] with a floating dtype on ",
                x.device(), ", got shape ", shape_str(v), " with dtype ", v.scalar_type(), " on ", v.device());
  };
  for (size_t i = 0; i < L; ++i) {
    const int64_t c = b.width(static_cast<int64_t>(i));
    check_w(w1[i], b.bottleneck ? b.B : b.k, c, "w1", i, b.bottleneck);
    check_v(g1[i], c, "gamma1", i);
    check_v(b1[i], c, "beta1", i);
    const std::optional<at::Tensor> m = rm1.get(i), v = rv1.get(i);
    TORCH_CHECK(m.has_value() == v.has_value(), "effdense::", op, ": running_mean1[", i, "] and running_var1[",
                i, "] must both be given (running statistics) or both be None (batch statistics)");
    b.bs1.push_back(!m.has_value());
    if (m) check_v(*m, c, "running_mean1", i), check_v(*v, c, "running_var1", i);
    TORCH_CHECK(drop[i] >= 0.0 && drop[i] < 1.0, "effdense::", op, ": expected drop_rate[", i,
                "] in [0, 1), got ", drop[i]);
    if (!b.bottleneck) continue;
    check_w(w2[i], b.k, b.B, "w2", i, false);
    check_v(g2[i], b.B, "gamma2", i);
    check_v(b2[i], b.B, "beta2", i);
    const std::optional<at::Tensor> m2 = rm2.get(i), v2 = rv2.get(i);
    TORCH_CHECK(m2.has_value() == v2.has_value(), "effdense::", op, ": running_mean2[", i, "] and running_var2[",
                i, "] must both be given or both be None");
    b.bs2.push_back(!m2.has_value());
    if (m2) check_v(*m2, b.B, "running_mean2", i), check_v(*v2, b.B, "running_var2", i);
  }
  bool any_batch = false;
  for (bool v : b.bs1) any_batch = any_batch || v;
  for (bool v : b.bs2) any_batch = any_batch || v;
  TORCH_CHECK(!any_batch || b.pixels() != 1, "Expected more than 1 value per channel when training, got input "
              "size [", b.N, ", ", C_total < 0 ? b.C0 : b.C, ", ", b.H, ", ", b.W, "]");
  return b;
}

bool any_of(const std::vector<bool>& v) {
  for (bool e : v)
    if (e) return true;
  return false;
}

bool all_of(const std::vector<bool>& v) {
  for (bool e : v)
    if (!e) return false;
  return true;
}

// ------------------------------------------------------------------------------------------ workspace

// Why a workspace: on CPU every allocation above glibc's mmap threshold (32 MiB at most) is a fresh zero-filled
// mapping, paid for in page faults at first touch (issue 15's profile: 330-600k faults, ~0.85 s a step at batch
// 64). So on CPU the block's transients come from one buffer kept across layers, blocks and steps, grown to the
// largest request (blocks run one at a time, so one buffer per process is enough) and freed by
// effdense._C.release_workspace(); effdense.memory.measure_step releases it first, so a measured peak includes
// it. A forward with a backward to come (reserve_backward) takes at once what its own backward will need: the
// first block has the most pixels and runs first, so the workspace reaches its full size in the step's first
// block call and never grows inside a step. A step after a release then lays out the heap as every later step
// does; grown in stages (6 -> 13 -> 42 MB at BC-100, batch 32), it left the smaller buffers as holes glibc kept
// resident (issue 15's speed suite: resident rise 1.51-1.83x the allocator's peak, 1.08-1.18x reserved). A
// mutex serializes block calls that would share it from several threads. On CUDA the caching allocator already
// reuses memory (and stream-orders it), so each call takes a fresh buffer from it, of its own size.
struct CpuWorkspace {
  std::mutex mu;
  at::Tensor buf;
};

CpuWorkspace& cpu_workspace() {
  static CpuWorkspace ws;
  return ws;
}

constexpr int64_t kAlign = 64;

int64_t aligned(int64_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

int64_t cl_bytes(int64_t N, int64_t c, int64_t H, int64_t W, at::ScalarType dt) {
  return aligned(N * c * H * W * static_cast<int64_t>(c10::elementSize(dt)));
}

// The buffers of one block call, as dense channels-last [N, c, H, W] views of one allocation.
class Scratch {
 public:
  Scratch(const at::Tensor& like, int64_t bytes) {
    if (like.is_cpu()) {
      CpuWorkspace& ws = cpu_workspace();
      lock_ = std::unique_lock<std::mutex>(ws.mu);
      if (!ws.buf.defined() || ws.buf.numel() < bytes) {
        ws.buf.reset();  // the old one first: growing never holds both
        ws.buf = at::empty({bytes}, like.options().dtype(at::kByte));
      }
      buf_ = ws.buf;
    } else {
      buf_ = at::empty({bytes}, like.options().dtype(at::kByte));
    }
  }

  // the next N*c*H*W elements of dtype dt, flat
  at::Tensor take_flat(int64_t N, int64_t c, int64_t H, int64_t W, at::ScalarType dt) {
    at::Tensor flat = buf_.narrow(0, off_, N * c * H * W * static_cast<int64_t>(c10::elementSize(dt))).view(dt);
    off_ += cl_bytes(N, c, H, W, dt);
    return flat;
  }
  at::Tensor take(int64_t N, int64_t c, int64_t H, int64_t W, at::ScalarType dt,
                  at::MemoryFormat mf = at::MemoryFormat::ChannelsLast) {
    at::Tensor flat = take_flat(N, c, H, W, dt);
    return mf == at::MemoryFormat::ChannelsLast ? cl_view(flat, N, c, H, W) : flat.view({N, c, H, W});
  }
  // a dense channels-last [N, c, H, W] view of the first N*c*H*W elements of a flat buffer
  static at::Tensor cl_view(const at::Tensor& flat, int64_t N, int64_t c, int64_t H, int64_t W) {
    return flat.narrow(0, 0, N * c * H * W).as_strided({N, c, H, W}, {H * W * c, 1, W * c, c});
  }

 private:
  std::unique_lock<std::mutex> lock_;
  at::Tensor buf_;
  int64_t off_ = 0;
};

// The workspace of one block's backward: the features' gradient G (accumulation dtype), the new channels'
// gradient, and per layer the recomputed bottleneck z (unless kept) and a = relu(bn2(z)), or the BN-ReLU output u.
int64_t backward_workspace_bytes(const Block& b, bool keep) {
  const int64_t N = b.N, H = b.H, W = b.W;
  return cl_bytes(N, b.C, H, W, b.acc) + cl_bytes(N, b.k, H, W, b.cdt) +
         (b.bottleneck ? (keep ? 1 : 2) * cl_bytes(N, b.B, H, W, b.cdt) : cl_bytes(N, b.C - b.k, H, W, b.cdt));
}

// A BN's (mean, var): the block's batch statistics of its first c channels, or its running statistics.
std::pair<at::Tensor, at::Tensor> bn_stats(bool batch, const at::Tensor& mean, const at::Tensor& var, int64_t row,
                                           int64_t c, const std::optional<at::Tensor>& rm,
                                           const std::optional<at::Tensor>& rv) {
  if (!batch) return {*rm, *rv};
  if (row >= 0) return {mean.select(0, row), var.select(0, row)};
  return {mean.narrow(0, 0, c), var.narrow(0, 0, c)};
}

// z = conv1x1(relu(bn1(x)), w) into `z`, with z's statistics into (out_mean, out_var) if given: the tiled
// BN-ReLU-GEMM op, or with EFFDENSE_FUSED_CONV1X1=1 the fused conv1x1 op (the tensor-core kernel on CUDA).
void linear_forward(const at::Tensor& x, const at::Tensor& g, const at::Tensor& bt,
                    const std::pair<at::Tensor, at::Tensor>& st, double eps, const at::Tensor& w, const at::Tensor& z,
                    const OptTensor& out_mean, const OptTensor& out_var) {
  if (!fused_conv1x1_enabled()) {
    bn_relu_linear_into(x, g, bt, st.first, st.second, eps, w, z, out_mean, out_var);
    return;
  }
  auto [scale, shift, invstd] = bn_scale_shift(g, bt, st.first, st.second, eps, acc_type(x.scalar_type()));
  z.copy_(bn_relu_conv1x1(x, scale, shift, w));
  if (out_mean) {
    auto [m, v] = channel_stats(z);
    const_cast<at::Tensor&>(*out_mean).copy_(m);
    const_cast<at::Tensor&>(*out_var).copy_(v);
  }
}

// Layer i's bottleneck in the kept [L, N, H, W, B] buffer: a channels-last [N, B, H, W] view.
at::Tensor kept_bottleneck(const at::Tensor& kept, int64_t i) { return kept.select(0, i).permute({0, 3, 1, 2}); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dense_block_forward(const at::Tensor& x, at::TensorList w1, at::TensorList w2, at::TensorList g1, at::TensorList b1,
                    at::TensorList g2, at::TensorList b2, const OptList& rm1, const OptList& rv1, const OptList& rm2,
                    const OptList& rv2, at::ArrayRef<double> eps1, at::ArrayRef<double> eps2,
                    at::ArrayRef<double> drop, bool keep_bottleneck, bool reserve_backward,
                    const OptString& sync_group, int64_t sync_size) {
  const char* op = "dense_block_forward";
  const Block b = parse(x, -1, w1, w2, g1, b1, g2, b2, rm1, rv1, rm2, rv2, eps1, eps2, drop, op);
  const std::optional<Sync> sync = make_sync(sync_group, sync_size, 0, x, op);
  int64_t count = b.pixels();  // the pixels the batch statistics span: every process's with sync
  auto merged = [&](const OptTensor& m, const OptTensor& v) {  // statistics a step wrote, over every process
    if (sync && m) count = merge_stats(*sync, *m, *v, b.pixels());
  };
  const c10::DeviceGuard guard(x.device());
  at::NoGradGuard no_grad;
  const auto opts = x.options(), aopts = x.options().dtype(b.acc);
  at::Tensor feat = at::empty({b.N, b.C, b.H, b.W}, opts, b.mf);
  const bool stats1 = any_of(b.bs1);
  at::Tensor mean = at::empty({stats1 ? b.C : 0}, aopts), var = at::empty({stats1 ? b.C : 0}, aopts);
  // outputs every entry of which is written stay uninitialized; the others are zeroed (eval-mode rows)
  const std::vector<int64_t> shape2{b.bottleneck ? b.L : 0, b.B};
  const bool rows2 = all_of(b.bs2);
  at::Tensor mean2 = rows2 ? at::empty(shape2, aopts) : at::zeros(shape2, aopts);
  at::Tensor var2 = rows2 ? at::empty(shape2, aopts) : at::zeros(shape2, aopts);
  bool any_drop = false, all_drop = true;
  for (double p : drop) any_drop = any_drop || p > 0, all_drop = all_drop && p > 0;
  at::Tensor mask = any_drop ? at::empty({b.N, b.L * b.k, b.H, b.W}, opts.dtype(at::kBool), b.mf)
                             : at::empty({0}, opts.dtype(at::kBool));
  if (any_drop && !all_drop) mask.zero_();
  auto stats_of = [&](int64_t c0, int64_t n) {
    return stats1 ? std::make_pair(OptTensor(mean.narrow(0, c0, n)), OptTensor(var.narrow(0, c0, n)))
                  : std::make_pair(OptTensor(), OptTensor());
  };
  {
    auto [m, v] = stats_of(0, b.C0);
    store_channels(x, std::nullopt, 0.0, feat.narrow(1, 0, b.C0), std::nullopt, m, v);
    merged(m, v);
  }
  const bool keep = keep_bottleneck && b.bottleneck;
  at::Tensor kept = at::empty({keep ? b.L : 0, b.N, b.H, b.W, b.B}, opts);
  const int64_t bytes = b.bottleneck ? cl_bytes(b.N, b.B, b.H, b.W, b.cdt) : cl_bytes(b.N, b.C - b.k, b.H, b.W, b.cdt);
  Scratch ws(x, reserve_backward && x.is_cpu() ? std::max(bytes, backward_workspace_bytes(b, keep)) : bytes);
  // a = relu(bn2(z)): in place over z, or beside the kept z
  at::Tensor a = b.bottleneck ? ws.take(b.N, b.B, b.H, b.W, b.cdt) : at::Tensor();
  at::Tensor u_all = b.bottleneck ? at::Tensor() : ws.take_flat(b.N, b.C - b.k, b.H, b.W, b.cdt);
  for (int64_t i = 0; i < b.L; ++i) {
    const size_t li = static_cast<size_t>(i);
    const int64_t c = b.width(i);
    const at::Tensor xin = feat.narrow(1, 0, c);
    const auto st1 = bn_stats(b.bs1[li], mean, var, -1, c, rm1.get(li), rv1.get(li));
    const double p = drop[li];
    const at::Tensor fresh = feat.narrow(1, c, b.k);
    auto [m, v] = stats_of(c, b.k);
    at::Tensor y;
    if (b.bottleneck) {
      const bool bs2 = b.bs2[li];
      const at::Tensor z = keep ? kept_bottleneck(kept, i) : a;
      const OptTensor m2 = bs2 ? OptTensor(mean2.select(0, i)) : OptTensor();
      const OptTensor v2 = bs2 ? OptTensor(var2.select(0, i)) : OptTensor();
      linear_forward(xin, g1[li], b1[li], st1, eps1[li], w1[li], z, m2, v2);
      merged(m2, v2);
      const auto st2 = bn_stats(bs2, mean2, var2, i, b.B, rm2.get(li), rv2.get(li));
      const bool own = own_conv3x3(z, w2[li]);
      if (own && p == 0) {  // no dropout: straight into F, with the new channels' statistics
        bn_relu_conv3x3_into(z, g2[li], b2[li], st2.first, st2.second, eps2[li], w2[li], fresh, m, v);
        merged(m, v);
        continue;
      }
      if (own) {
        y = at::empty({b.N, b.k, b.H, b.W}, opts, at::MemoryFormat::ChannelsLast);
        bn_relu_conv3x3_into(z, g2[li], b2[li], st2.first, st2.second, eps2[li], w2[li], y, std::nullopt,
                             std::nullopt);
      } else {
        batch_norm_relu_into(z, g2[li], b2[li], st2.first, st2.second, eps2[li], a);
        y = conv(a, w2[li]);
      }
    } else {
      const at::Tensor u = Scratch::cl_view(u_all, b.N, c, b.H, b.W);
      batch_norm_relu_into(xin, g1[li], b1[li], st1.first, st1.second, eps1[li], u);
      y = conv(u, w1[li]);
    }
    // the draw F.dropout makes on a tensor shaped and laid out as naive's conv output (empty_like + bernoulli_)
    const OptTensor noise = p > 0 ? OptTensor(at::empty({b.N, b.k, b.H, b.W}, opts, b.mf).bernoulli_(1.0 - p))
                                  : OptTensor();
    store_channels(y, noise, p, fresh, p > 0 ? OptTensor(mask.narrow(1, i * b.k, b.k)) : OptTensor(), m, v);
    merged(m, v);
  }
  return {feat, mean, var, mean2, var2, mask, kept, count_tensor(sync ? &*sync : nullptr, count)};
}

BlockGrads dense_block_backward(const at::Tensor& grad_out, const at::Tensor& feat, const at::Tensor& mean,
                                const at::Tensor& var, const at::Tensor& mean2, const at::Tensor& var2,
                                const at::Tensor& mask, const at::Tensor& kept, at::TensorList w1, at::TensorList w2,
                                at::TensorList g1, at::TensorList b1, at::TensorList g2, at::TensorList b2,
                                const OptList& rm1, const OptList& rv1, const OptList& rm2, const OptList& rv2,
                                at::ArrayRef<double> eps1, at::ArrayRef<double> eps2, at::ArrayRef<double> drop,
                                const OptString& sync_group, int64_t sync_size, int64_t sync_count) {
  const char* op = "dense_block_backward";
  const Block b = parse(feat, feat.dim() == 4 ? feat.size(1) : 0, w1, w2, g1, b1, g2, b2, rm1, rv1, rm2, rv2, eps1,
                        eps2, drop, op);
  check_same_shape(grad_out, feat, op, "grad_out");
  const std::optional<Sync> sync = make_sync(sync_group, sync_size, sync_count, feat, op);
  const Sync* s = sync ? &*sync : nullptr;
  const bool stats1 = any_of(b.bs1);
  TORCH_CHECK(!stats1 || (mean.dim() == 1 && mean.size(0) == b.C && var.sizes() == mean.sizes()),
              "effdense::", op, ": expected mean and var of shape [", b.C, "] (the forward's channel statistics), "
              "got ", shape_str(mean), " and ", shape_str(var));
  TORCH_CHECK(!b.bottleneck || (mean2.dim() == 2 && mean2.size(0) == b.L && mean2.size(1) == b.B &&
                                var2.sizes() == mean2.sizes()),
              "effdense::", op, ": expected mean2 and var2 of shape [", b.L, ", ", b.B, "], got ", shape_str(mean2),
              " and ", shape_str(var2));
  bool any_drop = false;
  for (double p : drop) any_drop = any_drop || p > 0;
  TORCH_CHECK(!any_drop || (mask.dim() == 4 && mask.size(1) == b.L * b.k && mask.scalar_type() == at::kBool),
              "effdense::", op, ": expected drop_mask of shape [", b.N, ", ", b.L * b.k, ", ", b.H, ", ", b.W,
              "] with dtype bool, got ", shape_str(mask), " with dtype ", mask.scalar_type());
  const bool keep = kept.numel() > 0;
  TORCH_CHECK(kept.numel() == 0 || (b.bottleneck && kept.dim() == 5 && kept.size(0) == b.L && kept.size(1) == b.N &&
                                    kept.size(2) == b.H && kept.size(3) == b.W && kept.size(4) == b.B &&
                                    kept.is_contiguous() && kept.scalar_type() == b.cdt),
              "effdense::", op, ": expected bottleneck empty or the forward's kept bottlenecks, contiguous [", b.L,
              ", ", b.N, ", ", b.H, ", ", b.W, ", ", b.B, "] with dtype ", b.cdt, ", got shape ", shape_str(kept),
              " with dtype ", kept.scalar_type());
  const c10::DeviceGuard guard(feat.device());
  at::NoGradGuard no_grad;
  const int64_t N = b.N, H = b.H, W = b.W;
  Scratch ws(feat, backward_workspace_bytes(b, keep));
  // G in F's layout: the BN1 backward then reads F and updates G with the same (plane or row) tiles
  at::Tensor G = ws.take(N, b.C, H, W, b.acc, b.mf), gy = ws.take(N, b.k, H, W, b.cdt);
  at::Tensor z = b.bottleneck && !keep ? ws.take(N, b.B, H, W, b.cdt) : at::Tensor();
  at::Tensor a = b.bottleneck ? ws.take(N, b.B, H, W, b.cdt) : at::Tensor();
  at::Tensor u_all = b.bottleneck ? at::Tensor() : ws.take_flat(N, b.C - b.k, H, W, b.cdt);
  G.copy_(grad_out);
  // the BN1 backward's batch-statistics corrections, deferred per channel (cpu/tiles.h apply_correction) and
  // applied when a channel's gradient is read: by gather_grad for a layer's new channels, at the end for x0's
  const OptTensor coef = stats1 ? OptTensor(at::zeros({2, b.C}, feat.options().dtype(b.acc))) : OptTensor();
  auto deferred = [&](int64_t c0, int64_t n) {
    return coef ? std::make_tuple(OptTensor(feat.narrow(1, c0, n)), OptTensor(coef->narrow(1, c0, n)),
                                  OptTensor(mean.narrow(0, c0, n)))
                : std::make_tuple(OptTensor(), OptTensor(), OptTensor());
  };
  const size_t L = static_cast<size_t>(b.L);
  std::vector<at::Tensor> dw1(L), dw2(b.bottleneck ? L : 0), dg1(L), db1(L), dg2(b.bottleneck ? L : 0),
      db2(b.bottleneck ? L : 0);
  for (int64_t i = b.L - 1; i >= 0; --i) {
    const size_t li = static_cast<size_t>(i);
    const int64_t c = b.width(i);
    const at::Tensor x = feat.narrow(1, 0, c);
    const auto st1 = bn_stats(b.bs1[li], mean, var, -1, c, rm1.get(li), rv1.get(li));
    const double p = drop[li];
    {
      auto [xs, cs, ms] = deferred(c, b.k);
      gather_grad(G.narrow(1, c, b.k), p > 0 ? OptTensor(mask.narrow(1, i * b.k, b.k)) : OptTensor(), p, gy, xs,
                  cs, ms);
    }
    const at::Tensor gx = G.narrow(1, 0, c);
    const OptTensor cf = coef ? OptTensor(coef->narrow(1, 0, c)) : OptTensor();
    if (b.bottleneck) {
      const bool bs2 = b.bs2[li];
      if (keep) z = kept_bottleneck(kept, i);
      else linear_forward(x, g1[li], b1[li], st1, eps1[li], w1[li], z, std::nullopt, std::nullopt);  // recompute
      const auto st2 = bn_stats(bs2, mean2, var2, i, b.B, rm2.get(li), rv2.get(li));
      at::Tensor ga = a, gw2;  // grad_a into a's buffer on CPU (a itself is recomputed inside the op)
      if (own_conv3x3(z, w2[li])) {
        gw2 = bn_relu_conv3x3_backward(z, gy, g2[li], b2[li], st2.first, st2.second, eps2[li], w2[li], a);
      } else {
        batch_norm_relu_into(z, g2[li], b2[li], st2.first, st2.second, eps2[li], a);
        std::tie(ga, gw2) = conv_backward(gy, a, w2[li]);
      }
      std::tie(dw1[li], dg1[li], db1[li], dg2[li], db2[li]) =
          bottleneck_backward(x, z, ga, w1[li], g1[li], b1[li], st1.first, st1.second, eps1[li], b.bs1[li], g2[li],
                              b2[li], st2.first, st2.second, eps2[li], bs2, gx, cf, s);
      dw2[li] = gw2;
    } else {
      const at::Tensor u = Scratch::cl_view(u_all, N, c, H, W);
      batch_norm_relu_into(x, g1[li], b1[li], st1.first, st1.second, eps1[li], u);
      auto [gu, gw1] = conv_backward(gy, u, w1[li]);
      std::tie(dg1[li], db1[li]) = batch_norm_relu_backward_into(x, gu, g1[li], b1[li], st1.first, st1.second,
                                                                 eps1[li], b.bs1[li], gx, true, cf, s);
      dw1[li] = gw1;
    }
  }
  at::Tensor gx = at::empty({b.N, b.C0, b.H, b.W}, feat.options(), b.mf);
  auto [xs, cs, ms] = deferred(0, b.C0);
  gather_grad(G.narrow(1, 0, b.C0), std::nullopt, 0.0, gx, xs, cs, ms);
  return {gx, dw1, dw2, dg1, db1, dg2, db2};
}

int64_t workspace_bytes() {
  CpuWorkspace& ws = cpu_workspace();
  std::lock_guard<std::mutex> lock(ws.mu);
  return ws.buf.defined() ? ws.buf.numel() : 0;
}

void release_workspace() {
  CpuWorkspace& ws = cpu_workspace();
  std::lock_guard<std::mutex> lock(ws.mu);
  ws.buf.reset();
}

}  // namespace effdense
