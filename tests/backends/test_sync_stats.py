"""``--sync-bn`` at the block level: a dense block split over 2 processes (gloo, CPU) with cross-process statistics
equals one process running the whole batch.

Each process holds a different number of images (2 and 3: the merge must weight by count; 0 and 3: an empty
process still takes part in every collective, or the other one would wait forever). Checked per process:
its slice of the output and of the input gradient, the running statistics, and the parameter gradients, which
stay local (DDP averages them), so their sum over the processes equals the one-process gradient. The reference
is the ``"torch"`` backend without synchronization on the combined batch; the ``"triton"`` backend runs in
Triton's interpreter (``TRITON_INTERPRET=1``, which conftest.py sets without a GPU and the workers inherit); the
``"cpp"`` backend merges the statistics in C++ (csrc/sync.h: the _c10d_functional collectives). The cpp
transition and a whole cpp DenseNet-BC are checked the same way.
"""
from __future__ import annotations

import datetime
import functools
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
DTYPES = {"torch": torch.float64, "triton": torch.float32, "cpp": torch.float64}
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


def _spawn(worker, tmp_path, batches, *args):
    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.spawn(_run, args=(len(batches), _free_port(), worker, batches, str(tmp_path), *args), nprocs=len(batches))
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(batches))]


def _run(rank, world, port, worker, batches, out_dir, *args):
    """A worker process: its gloo group, ``worker(rank, batches, *args)``'s result saved for the parent."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))   # a missed collective fails, not hangs
    try:
        torch.save(worker(rank, batches, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _synced_step(module, x, rank, batches, sync):
    """_step of ``module`` on this process's rows of ``x``, with --sync-bn's statistics if ``sync``."""
    rows = slice(sum(batches[:rank]), sum(batches[:rank + 1]))
    if sync:
        bn.enable_sync_stats()
    try:
        return _step(module, x[rows], rows, sum(batches))
    finally:
        bn.disable_sync_stats()


def _block_step(rank, batches, backend, label):
    kwargs, image = CONFIGS[label]
    dtype = DTYPES[backend]
    block = make_block({**kwargs, "backend": backend}, {}, dtype).train()
    return _synced_step(block, make_input((sum(batches), *image), {}, dtype), rank, batches, True)


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("label", list(CONFIGS))
@pytest.mark.parametrize("backend", list(DTYPES))
def test_sync_stats_block_equals_one_process(tmp_path, backend, label, split):
    why = backends.unavailable_reason(backend, "cpu", DTYPES[backend])
    if why is not None:
        pytest.skip(f"backend {backend!r} unavailable on CPU: {why}")
    batches = SPLITS[split]
    ranks = _spawn(_block_step, tmp_path, batches, backend, label)

    kwargs, image = CONFIGS[label]
    dtype = DTYPES[backend]
    shape = (sum(batches), *image)
    ref = _step(make_block({**kwargs, "backend": "torch"}, {}, dtype).train(), make_input(shape, {}, dtype),
                slice(None), sum(batches))
    local = None
    if batches[0] > 1:    # the test can tell: process 0's own statistics give a different output
        local = _step(make_block({**kwargs, "backend": "torch"}, {}, dtype).train(),
                      make_input(shape, {}, dtype)[:batches[0]], slice(0, batches[0]), sum(batches))
    _assert_equals_one_process(ranks, ref, batches, RTOL[dtype], local)


def _assert_equals_one_process(ranks, ref, batches, tol, local=None):
    """Each process's slice of the output and of the input gradient, its running statistics, and the parameter
    gradients summed over the processes equal one process's on the whole batch (``ref``); ``local``, process 0's
    step on its own images without synchronization, differs (so the comparison can tell)."""
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
    if local is not None:
        assert rel_err(local[0], y_ref[:batches[0]]) > 1e-3


# ------------------------------------------------------------------------------------------------ cpp extras

def _transition_step(rank, batches, backend, sync):
    from effdense.models import Transition

    torch.manual_seed(3)
    t = Transition(6, 4, backend=backend).double().train()
    t.norm.weight.data.uniform_(0.5, 1.5)
    t.norm.bias.data.uniform_(-0.3, 0.3)
    return _synced_step(t, make_input((sum(batches), 6, 6, 5), {}).double(), rank, batches, sync)


@pytest.mark.parametrize("split", list(SPLITS))
def test_sync_stats_cpp_transition_equals_one_process(tmp_path, split):
    """The cpp transition's batch statistics merged over 2 processes (C++), forward and backward, float64."""
    why = backends.unavailable_reason("cpp", "cpu", torch.float64)
    if why is not None:
        pytest.skip(f"backend 'cpp' unavailable on CPU: {why}")
    batches = SPLITS[split]
    ranks = _spawn(_transition_step, tmp_path, batches, "cpp", True)
    local = _transition_step(0, (batches[0],), "naive", False) if batches[0] > 1 else None
    _assert_equals_one_process(ranks, _transition_step(0, (sum(batches),), "naive", False), batches, 1e-10, local)


def _model_step(rank, batches, backend, sync=True, convert=False):
    """One training step of a float64 DenseNet-BC on this process's images: its dense blocks' and transitions'
    statistics are the backend's (for cpp merged in C++ under --sync-bn). Without ``convert`` norm5, the one batch
    norm outside them, runs on its running statistics; with it, every batch norm module becomes a
    :class:`~effdense.backends.bn.SyncBatchNorm2d` (what ``effdense-train --sync-bn`` does on CPU) and trains."""
    import effdense

    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=10, growth_rate=4, num_classes=5, backend=backend).double().train()
    if convert and sync:
        bn.convert_sync_batchnorm(model)
    elif not convert:
        model.features.norm5.eval()
    return _synced_step(model, make_input((sum(batches), 3, 8, 8), {}).double(), rank, batches, sync)


@pytest.mark.parametrize("split", list(SPLITS))
def test_sync_stats_cpp_model_equals_one_naive_process(tmp_path, split):
    """A whole cpp DenseNet-BC (blocks and transitions) under --sync-bn over 2 processes (gloo) equals naive on the
    whole batch in one process, which is what synchronized batch norms compute (float64): each process's slice of
    the output and input gradient, the running statistics, the parameter gradients summed over the processes."""
    why = backends.unavailable_reason("cpp", "cpu", torch.float64)
    if why is not None:
        pytest.skip(f"backend 'cpp' unavailable on CPU: {why}")
    batches = SPLITS[split]
    ranks = _spawn(_model_step, tmp_path, batches, "cpp")
    local = _model_step(0, (batches[0],), "naive", False) if batches[0] > 1 else None
    _assert_equals_one_process(ranks, _model_step(0, (sum(batches),), "naive", False), batches, 1e-10, local)


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("backend", ["naive", "torch", "cpp"])
def test_sync_batchnorm_model_equals_one_naive_process(tmp_path, backend, split):
    """``effdense-train --sync-bn`` on CPU: every batch norm a SyncBatchNorm2d (effdense.backends.bn's formulas:
    Chan's merge of every process's statistics, the backward's sums all-reduced) and the backend's blocks merging
    theirs, over 2 gloo processes, equals naive with plain batch norms on the whole batch in one process (float64),
    norm5 and the transitions included."""
    why = backends.unavailable_reason(backend, "cpu", torch.float64)
    if why is not None:
        pytest.skip(f"backend {backend!r} unavailable on CPU: {why}")
    batches = SPLITS[split]
    ranks = _spawn(functools.partial(_model_step, convert=True), tmp_path, batches, backend)
    local = _model_step(0, (batches[0],), "naive", False) if batches[0] > 1 else None
    _assert_equals_one_process(ranks, _model_step(0, (sum(batches),), "naive", False, convert=True), batches, 1e-10,
                               local)
