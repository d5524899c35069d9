"""CUDA only (skipped elsewhere; run by benchmarks/gpu_run.sh): whole models on the GPU against ``naive``.

* every backend, a small DenseNet-BC (stem, blocks, transitions, classifier), 3 SGD steps: float64 where the
  backend has it, else float32 with TF32 off, NCHW and channels-last input;
* bf16 and fp16 autocast: each memory-efficient backend's error against a float64 reference at most twice
  naive's own autocast error plus a dtype floor;
* a 20-step DenseNet-BC-100 (k=12) loss curve of ``triton`` and ``cpp`` against ``naive``, float32 without TF32.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import effdense
from effdense import backends
from utils import assert_runs_close, rel_err, requires_cuda, run_steps

pytestmark = requires_cuda

#: relative tolerance against naive of a whole model after 3 SGD steps (TF32 off)
MODEL_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
#: autocast: allowed error = 2 x naive's own error against float64 + this floor
AUTOCAST_FLOOR = {torch.bfloat16: 1e-3, torch.float16: 2e-4}
#: 20-step loss curve, float32 without TF32: largest relative difference of a step's loss from naive's. Rounding
#: differences (summation order) grow through the steps; a wrong gradient moves the curve by far more than this
CURVE_RTOL = 2e-3
CURVE_STEPS = 20


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _dtype_for(backend: str) -> torch.dtype:
    cuda = torch.device("cuda")
    return torch.float64 if backends.unavailable_reason(backend, cuda, torch.float64) is None else torch.float32


def _skip_unavailable(backend: str, dtype: torch.dtype) -> None:
    why = backends.unavailable_reason(backend, torch.device("cuda"), dtype)
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", ["checkpoint", "torch", "cpp", "triton"])
def test_model_matches_naive_on_cuda(backend, channels_last):
    dtype = _dtype_for(backend)
    _skip_unavailable(backend, dtype)
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=16, growth_rate=6, num_classes=7).to("cuda", dtype)
    x = torch.randn(3, 3, 13, 11, device="cuda", dtype=dtype)     # odd sizes: 13x11 -> 6x5 -> 3x2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_runs_close(run_steps(model, backend, x), run_steps(model, "naive", x), MODEL_RTOL[dtype])


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_autocast_error_at_most_twice_naives(backend, amp):
    _skip_unavailable(backend, amp)
    torch.manual_seed(0)
    reference = effdense.densenet_cifar(depth=16, growth_rate=12).cuda()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")

    def grads(name: str, dtype: torch.dtype, autocast: bool) -> list[torch.Tensor]:
        m = copy.deepcopy(reference).to(dtype)
        m.set_backend(name)
        with torch.autocast("cuda", dtype=amp, enabled=autocast):
            logits = m(x.to(dtype))
        F.cross_entropy(logits.float(), y).backward()
        return [logits.detach()] + [p.grad for p in m.parameters()]

    ref = grads("naive", torch.float64, False)
    naive = grads("naive", torch.float32, True)
    got = grads(backend, torch.float32, True)
    names = ["logits"] + [n for n, _ in reference.named_parameters()]
    for name, g, n, r in zip(names, got, naive, ref):
        assert rel_err(g, r) <= 2 * rel_err(n, r) + AUTOCAST_FLOOR[amp], \
            f"{name}: {backend} {rel_err(g, r):.3g} vs naive's {rel_err(n, r):.3g}"


def _loss_curve(backend: str, batches: list) -> list[float]:
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=100, growth_rate=12, backend=backend).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    losses = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return [float(v) for v in torch.stack(losses).cpu()]


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_bc100_loss_curve_matches_naive(backend):
    _skip_unavailable(backend, torch.float32)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 3, 32, 32, generator=g).cuda(), torch.randint(0, 10, (32,), generator=g).cuda())
               for _ in range(CURVE_STEPS)]
    ref, got = _loss_curve("naive", batches), _loss_curve(backend, batches)
    assert ref[-1] < ref[0], f"naive did not train: {ref}"
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    assert worst <= CURVE_RTOL, f"{backend} loss curve off naive's by {worst:.3g}:\n{got}\n{ref}"
