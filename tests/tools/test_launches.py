"""effdense.tools.launches on CPU: what counts as a launch and a host sync, the dry run of Triton launches, the
dense-block ranges; and issue 11's budgets held with it: each kernel backend launches no more kernels than
``naive`` in a DenseNet-BC-40 training step, and no host sync happens inside a dense block (dropout on)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effdense
from effdense import backends
from effdense.tools.launches import BLOCK_RANGE, count_launches, label_blocks

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

requires_interpreter = pytest.mark.skipif(
    backends.unavailable_reason("triton", torch.device("cpu"), torch.float32) is not None,
    reason="the triton backend on CPU needs Triton's interpreter (TRITON_INTERPRET=1 before import)")
requires_cpp = pytest.mark.skipif(backends.unavailable_reason("cpp", torch.device("cpu"), torch.float32)
                                  is not None, reason="effdense._C is not built")


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)


def _model_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, item: bool = False):
    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if item:
            loss.item()       # the model-level sync of a training loop: outside every block
    return step


def _bc(depth: int, backend: str, k: int = 12, drop_rate: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return effdense.densenet_cifar(depth=depth, growth_rate=k, drop_rate=drop_rate, backend=backend)


def _data(size: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)


# ------------------------------------------------------------------------------------------ what is counted

def test_views_and_allocations_launch_nothing_and_leaf_ops_count_once():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(3, 4, 1, 1)
    assert count_launches(lambda: x.view(2, -1)[1:].t().unsqueeze(0).expand(3, -1, -1)).total == 0
    assert count_launches(lambda: torch.empty(7)).total == 0
    copying = count_launches(lambda: x.view(2, -1).t().reshape(-1))
    assert copying.ops == {"aten::copy_": 1}, "a reshape that copies counts"
    # aten::conv2d -> convolution -> _convolution -> the backend's kernel: one launch, the leaf
    conv = count_launches(lambda: F.conv2d(x, w))
    assert conv.total == 1 and conv.aten == 1 and conv.triton == 0, conv.ops
    both = count_launches(lambda: (x.exp(), x.relu()))
    assert both.ops == {"aten::exp": 1, "aten::clamp_min": 1}, both.ops


def test_host_syncs_are_counted_with_their_ranges():
    x = torch.randn(4)
    got = count_launches(lambda: (x.sum().item(), float(x[0]), bool(x[1] > 0)))
    assert sum(got.syncs.values()) == 3 and set(got.syncs) == {"aten::_local_scalar_dense"}
    assert got.syncs_in() == 0 and got.sync_ranges == [[], [], []]


def test_a_triton_launch_counts_once_without_the_interpreters_own_ops():
    x = torch.zeros(10)
    got = count_launches(lambda: _add_one[(2,)](x, 10, BLOCK=8))
    assert got.ops == {"triton::_add_one": 1} and got.triton == 1 and got.aten == 0, got.ops
    assert torch.equal(x, torch.ones(10)), "a real count runs the kernel"


def test_dry_run_counts_the_launch_without_running_it():
    x = torch.zeros(10)
    got = count_launches(lambda: _add_one[(2,)](x, 10, BLOCK=8), dry_run=True, warmup=2)
    assert got.ops == {"triton::_add_one": 1}, got.ops
    assert torch.equal(x, torch.zeros(10)), "a dry launch (warm-up ones included) must not run the kernel"
    count_launches(lambda: _add_one[(2,)](x, 10, BLOCK=8))
    assert torch.equal(x, torch.ones(10)), "after a dry run, launches run again"


@requires_interpreter
def test_dry_run_counts_equal_real_counts_of_a_training_step():
    """The dry run's premise: the host does the same whatever the kernels compute. A small triton model (dense
    blocks and transitions, dropout on so the seeds' host work is included), one step each way. 4x4 images:
    the interpreter's cost is per launch (about 0.3 s each here), so this is the one really interpreted step."""
    x, y = _data(4)
    real_model, dry_model = _bc(10, "triton", k=4, drop_rate=0.2), _bc(10, "triton", k=4, drop_rate=0.2)
    real = count_launches(_model_step(real_model, x, y))       # first steps both: one-off work is the same
    dry = count_launches(_model_step(dry_model, x, y), dry_run=True)
    assert real.triton > 0 and real.aten > 0
    assert dry.ops == real.ops, (dry.ops - real.ops, real.ops - dry.ops)
    assert dry.syncs == real.syncs


# ------------------------------------------------------------------------------------------- block ranges

class _Sync(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g.sum().item()                # a planted host sync in the block's backward
        return g


class _PlantedBlock(effdense.EfficientDenseBlock):
    def forward(self, x):
        out = super().forward(x)
        out.sum().item()              # a planted host sync in the block's forward
        return _Sync.apply(out)


def test_block_ranges_find_syncs_in_block_forward_and_backward_only():
    block = _PlantedBlock(2, 4, bn_size=2, growth_rate=2, backend="torch")
    x = torch.randn(2, 4, 4, 4, requires_grad=True)

    def step():
        loss = block(x).square().sum()
        loss.backward()
        loss.item()                   # outside the block
    with label_blocks(block):
        got = count_launches(step)
    assert got.ranges == {BLOCK_RANGE + ".forward": 1, BLOCK_RANGE + ".backward": 1}, got.ranges
    assert sum(got.syncs.values()) == 3
    assert got.syncs_in(BLOCK_RANGE + ".forward") == 1 and got.syncs_in(BLOCK_RANGE + ".backward") == 1
    assert got.syncs_in() == 2
    assert "forward" not in block.__dict__, "label_blocks restores the block's own forward"


# ---------------------------------------------------------------------------------- issue 11's budgets

def _bc40_launches(backend: str, dry_run: bool = False) -> int:
    """One DenseNet-BC-40 (k=12) training step, batch 2. The images are 8x8, not 32x32: no launch count
    depends on the image size (the same ops run on smaller planes), and the step is four times cheaper."""
    x, y = _data(8)
    return count_launches(_model_step(_bc(40, backend), x, y), dry_run=dry_run, warmup=1).total


@pytest.fixture(scope="module")
def naive_bc40() -> int:
    return _bc40_launches("naive")


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_cpp),
                                     pytest.param("triton", marks=requires_interpreter)])
def test_kernel_backend_launches_no_more_than_naive_bc40(backend, naive_bc40):
    got = _bc40_launches(backend, dry_run=backend == "triton")
    assert got <= naive_bc40, f"{backend}: {got} launches in a BC-40 training step, naive {naive_bc40} " \
                              f"({got / naive_bc40:.2f}x; see python -m benchmarks --suite launches)"


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=requires_cpp),
                                     pytest.param("triton", marks=requires_interpreter)])
def test_no_host_sync_inside_the_dense_blocks_with_dropout(backend):
    """A training step of a small DenseNet-BC with dropout (triton: a dry run, whose syncs equal a real run's,
    see above); the training loop's own ``loss.item()`` is outside every block and is seen (so the detector is
    live), none is inside."""
    model = _bc(10, backend, k=4, drop_rate=0.2)
    x, y = _data(8)
    with label_blocks(model):
        got = count_launches(_model_step(model, x, y, item=True), dry_run=backend == "triton", warmup=1)
    assert got.ranges == {BLOCK_RANGE + ".forward": 3, BLOCK_RANGE + ".backward": 3}, got.ranges
    assert sum(got.syncs.values()) >= 1, "the loss.item() outside the blocks must be seen"
    inside = [r for r in got.sync_ranges if any(n.startswith(BLOCK_RANGE) for n in r)]
    assert not inside, f"{backend}: {len(inside)} host syncs inside the dense blocks, under {inside[:3]}"
