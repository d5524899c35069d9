"""GPU micro-benchmark of the fused Triton kernels against the PyTorch sequences they replace (not run in CI).

    python benchmarks/bench_triton_kernels.py [--batch 64] [--dtype bf16] [--json out.json]

Per DenseNet-BC-100 (k=12, CIFAR 32x32) layer shape: the fused BN-ReLU-Conv1x1 forward against
``F.batch_norm`` + ``relu`` + ``conv2d`` on the materialized concatenation prefix, the fused BN-ReLU-Conv3x3
forward against the same for conv2, and one dense block (forward + backward) for ``naive``, ``torch`` and
``triton``: median time (``triton.testing.do_bench``) and peak memory. tf32 follows
``torch.backends.cuda.matmul.allow_tf32`` (printed).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import effdense
from effdense import info
from effdense.backends.bn import bn_relu, channel_stats
from effdense.kernels import bn_relu_conv_fwd

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_conv(n, c, cout, ks, hw, dtype):
    dev = "cuda"
    feat = torch.randn(n, c + 12, hw, hw, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x = feat[:, :c]
    scale, shift = torch.rand(c, device=dev) + 0.5, torch.randn(c, device=dev) * 0.1
    w = torch.randn(cout, c, ks, ks, device=dev, dtype=dtype) / (c * ks * ks) ** 0.5
    out = torch.empty(n, cout, hw, hw, device=dev, dtype=dtype, memory_format=torch.channels_last)

    def fused():
        return bn_relu_conv_fwd(x, scale, shift, w, out, stats=True)

    def reference():  # what an unfused block does: BN-ReLU materialized, conv, then statistics of the output
        y = F.conv2d(bn_relu(x, scale, shift, dtype), w, padding=ks // 2)
        return channel_stats(y)

    fused(), reference()
    t_f, t_r = do_bench(fused), do_bench(reference)
    return dict(n=n, c=c, cout=cout, ks=ks, hw=hw, fused_ms=t_f, torch_ms=t_r, speedup=t_r / t_f)


def bench_block(backend, n, dtype, layers=16, c0=24, k=12, hw=32):
    torch.manual_seed(0)
    block = effdense.EfficientDenseBlock(layers, c0, bn_size=4, growth_rate=k, backend=backend).cuda()
    x = torch.randn(n, c0, hw, hw, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            y = block(x)
        y.float().sum().backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    peak = torch.cuda.max_memory_allocated() - base
    return dict(backend=backend, n=n, ms=do_bench(step), peak_mib=peak / 2 ** 20)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    meta = info.environment(torch.device("cuda")) | dict(dtype=args.dtype, batch=args.batch)
    print(meta)
    convs = []
    for c in (24, 96, 168, 216):                      # channel prefixes of DenseNet-BC-100's first block
        convs.append(bench_conv(args.batch, c, 48, 1, 32, dtype))
    convs.append(bench_conv(args.batch, 48, 12, 3, 32, dtype))
    for r in convs:
        print(f"conv{r['ks']}x{r['ks']} c={r['c']:4d} -> {r['cout']:3d}: fused {r['fused_ms']:.3f} ms, "
              f"torch {r['torch_ms']:.3f} ms, speedup {r['speedup']:.2f}x")
    blocks = [bench_block(b, args.batch, dtype) for b in ("naive", "torch", "triton")]
    for r in blocks:
        print(f"block {r['backend']:7s}: {r['ms']:.2f} ms, peak {r['peak_mib']:.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, convs=convs, blocks=blocks), f, indent=2)


if __name__ == "__main__":
    main()
