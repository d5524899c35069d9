"""``python -m effdense.demo``: one training step of DenseNet-BC at two depths with each backend, printing
peak activation memory and step time (CUDA if available, else CPU)."""
from __future__ import annotations

import argparse
import time

import torch

from .memory import measure_step, training_step
from .models import densenet_cifar


def run(depths=(100, 196), batch: int = 32, backends=("naive", "checkpoint", "torch"),
        device: str | None = None) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for depth in depths:
        for backend in backends:
            torch.manual_seed(0)
            model = densenet_cifar(depth=depth, growth_rate=12, backend=backend).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            x = torch.randn(batch, 3, 32, 32, device=device)
            y = torch.randint(0, 10, (batch,), device=device)
            training_step(model, x[:2], y[:2], opt)()          # gradients and optimizer state now exist
            start = time.perf_counter()
            mem = measure_step(training_step(model, x, y, opt), device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rows.append(dict(depth=depth, backend=backend, peak_mib=mem.peak_mib,
                             seconds=time.perf_counter() - start))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--depths", type=int, nargs="+", default=[100, 196])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    rows = run(tuple(args.depths), args.batch_size, device=args.device)
    print(f"DenseNet-BC k=12, 32x32, batch {args.batch_size}, one training step (SGD)")
    print(f"{'depth':>5}  {'backend':<11}{'peak MiB':>10}{'vs naive':>10}{'seconds':>9}")
    for r in rows:
        naive = next(q for q in rows if q["depth"] == r["depth"] and q["backend"] == "naive")
        print(f"{r['depth']:>5}  {r['backend']:<11}{r['peak_mib']:>10.1f}{r['peak_mib'] / naive['peak_mib']:>10.2f}"
              f"{r['seconds']:>9.2f}")


if __name__ == "__main__":
    main()
