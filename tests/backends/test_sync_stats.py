"""``--sync-bn`` at the block level: a dense block split over 2 processes (gloo, CPU) with cross-process statistics
equals one process running the whole batch.

Each process holds a different number of images (2 and 3: the merge must weight by count; 0 and 3: an empty
process still takes part in every collective, or the other one would wait forever). Checked per process:
its slice of the output and of the input gradient, the running statistics, and the parameter gradients, which
stay local (DDP averages them), so their sum over the processes equals the one-process gradient. The reference
is the ``"torch"`` backend without synchronization on the combined batch; the ``"triton"`` backend runs in
Triton's interpreter (``TRITON_INTERPRET=1``, which conftest.py sets without a GPU and the workers inherit).
"""
from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from effdense import backends
from effdense.backends import bn
from utils import make_block, make_input, rel_err

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

#: images per process
SPLITS = {"2+3": (2, 3), "0+3": (0, 3)}
# label: (block kwargs, image shape)
CONFIGS = {
    "bc-5x3": (dict(num_layers=2, num_input_features=4, bn_size=2, growth_rate=3), (4, 5, 3)),
    "plain-3x5": (dict(num_layers=2, num_input_features=3, growth_rate=2, bottleneck=False), (3, 3, 5)),
}
DTYPES = {"torch": torch.float64, "triton": torch.float32}
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(block, x: torch.Tensor, rows: slice, total: int):
    """One training forward/backward of ``block`` on ``x`` with a fixed weighted-sum loss over ``rows`` of the
    combined batch of ``total`` images; returns output, input gradient, parameter gradients and running
    statistics."""
    x = x.detach().requires_grad_(True)
    y = block(x)
    full = (total, *y.shape[1:])
    weight = torch.linspace(-1.0, 1.0, torch.Size(full).numel(), dtype=y.dtype).view(full)[rows]
    (y * weight).sum().backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
             for n, p in block.named_parameters()}
    running = {n: b.detach().clone() for n, b in block.named_buffers()}
    return y.detach(), x.grad.detach(), grads, running


def _worker(rank: int, world: int, port: int, backend: str, label: str, batches: tuple, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))   # a missed collective fails, not hangs
    try:
        kwargs, image = CONFIGS[label]
        dtype = DTYPES[backend]
        block = make_block({**kwargs, "backend": backend}, {}, dtype).train()
        x = make_input((sum(batches), *image), {}, dtype)
        rows = slice(sum(batches[:rank]), sum(batches[:rank + 1]))
        bn.enable_sync_stats()
        try:
            result = _step(block, x[rows], rows, sum(batches))
        finally:
            bn.disable_sync_stats()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("label", list(CONFIGS))
@pytest.mark.parametrize("backend", list(DTYPES))
def test_sync_stats_block_equals_one_process(tmp_path, backend, label, split):
    why = backends.unavailable_reason(backend, "cpu", DTYPES[backend])
    if why is not None:
        pytest.skip(f"backend {backend!r} unavailable on CPU: {why}")
    batches = SPLITS[split]
    mp.spawn(_worker, args=(len(batches), _free_port(), backend, label, batches, str(tmp_path)),
             nprocs=len(batches))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(batches))]

    kwargs, image = CONFIGS[label]
    dtype = DTYPES[backend]
    shape = (sum(batches), *image)
    ref = _step(make_block({**kwargs, "backend": "torch"}, {}, dtype).train(), make_input(shape, {}, dtype),
                slice(None), sum(batches))
    tol = RTOL[dtype]
    y_ref, gx_ref, grads_ref, running_ref = ref
    start = 0
    for r, (y, gx, _, running) in enumerate(ranks):
        rows = slice(start, start + batches[r])
        start += batches[r]
        assert rel_err(y, y_ref[rows]) < tol, f"process {r}: output"
        assert rel_err(gx, gx_ref[rows]) < tol, f"process {r}: input gradient"
        for name, value in running.items():
            assert rel_err(value, running_ref[name]) < tol, f"process {r}: buffer {name}"
    for name, g in grads_ref.items():
        total = sum(rank[2][name] for rank in ranks)
        assert rel_err(total, g) < tol, f"gradient of {name} summed over the processes"
    if batches[0] > 1:    # the test can tell: process 0's own statistics give a different output
        local = _step(make_block({**kwargs, "backend": "torch"}, {}, dtype).train(),
                      make_input(shape, {}, dtype)[:batches[0]], slice(0, batches[0]), sum(batches))
        assert rel_err(local[0], y_ref[:batches[0]]) > 1e-3
