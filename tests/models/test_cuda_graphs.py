"""effdense.cuda_graphs: a captured whole training step (forward, backward, optimizer step) equals the eager
steps, BN running statistics included.

On CPU the same static-tensor step runs uncaptured (``capture=False``): that checks the part a GPU does not
add, the undoing of the warm-up steps (parameters, buffers, optimizer state, random-number states) and the
learning-rate schedule reaching a tensor ``lr``, exactly (float64, bit-equal). On CUDA the captured graph's
replays are compared with eager steps of an identical copy."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import effdense
from effdense import backends
from effdense.cuda_graphs import GraphedStep, compiled_step, make_capturable
from utils import rel_err, requires_cuda

#: relative tolerance of replayed vs eager steps after STEPS steps, by dtype (CUDA; fp32 with TF32 off): the
#: same kernels run in both, so only non-deterministic reductions (atomics in weight gradients) differ
CUDA_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
STEPS = 4


def _available(backend: str, device: str, dtype: torch.dtype) -> bool:
    return backends.unavailable_reason(backend, torch.device(device), dtype) is None


def _model(backend: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=10, growth_rate=4, backend=backend).to(device, dtype)
    for m in model.modules():          # non-trivial BN state, so that a wrong restore shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.train()


def _optimizer(model: torch.nn.Module, device: str) -> tuple[torch.optim.Optimizer, object]:
    opt = make_capturable(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                          weight_decay=1e-4), torch.device(device))
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)


def _batches(dtype: torch.dtype, device: str, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, size, size, generator=g, dtype=dtype).to(device),
             torch.randint(0, 10, (4,), generator=g).to(device)) for _ in range(STEPS)]


def _eager_and_graphed(backend: str, dtype: torch.dtype, device: str, capture: bool):
    eager_model = _model(backend, dtype, device)
    graphed_model = copy.deepcopy(eager_model)
    batches = _batches(dtype, device)
    opt, sched = _optimizer(eager_model, device)
    eager_losses = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(eager_model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        eager_losses.append(loss.detach().clone())
    gopt, gsched = _optimizer(graphed_model, device)
    step = GraphedStep(graphed_model, gopt, F.cross_entropy, *batches[0], capture=capture)
    graphed_losses = []
    for x, y in batches:
        loss, _ = step(x, y)
        gsched.step()
        graphed_losses.append(loss.clone())
    return (eager_model, eager_losses), (graphed_model, graphed_losses)


def _states(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("backend", ["naive", "torch", "cpp"])
def test_static_step_equals_eager_steps_bit_for_bit_cpu(backend):
    if not _available(backend, "cpu", torch.float64):
        pytest.skip(backends.unavailable_reason(backend, torch.device("cpu"), torch.float64))
    (em, el), (gm, gl) = _eager_and_graphed(backend, torch.float64, "cpu", capture=False)
    for step, (a, b) in enumerate(zip(gl, el)):
        assert torch.equal(a, b), f"step {step}: loss {a.item()} != eager {b.item()}"
    es, gs = _states(em), _states(gm)
    assert es.keys() == gs.keys()
    for name in es:
        assert torch.equal(gs[name], es[name]), f"{name} differs after {STEPS} steps (running stats included)"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["naive", "checkpoint", "torch", "cpp", "triton"])
def test_replayed_steps_equal_eager_steps_cuda(backend, dtype, monkeypatch):
    if not _available(backend, "cuda", dtype):
        pytest.skip(backends.unavailable_reason(backend, torch.device("cuda"), dtype))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    (em, el), (gm, gl) = _eager_and_graphed(backend, dtype, "cuda", capture=True)
    rtol = CUDA_RTOL[dtype]
    for step, (a, b) in enumerate(zip(gl, el)):
        assert rel_err(a, b) <= rtol, f"step {step}: loss rel err {rel_err(a, b):.3g}"
    es, gs = _states(em), _states(gm)
    for name in es:
        if name.endswith("num_batches_tracked"):
            assert int(gs[name]) == int(es[name]) == STEPS, name
        else:
            assert rel_err(gs[name], es[name]) <= rtol, f"{name}: rel err {rel_err(gs[name], es[name]):.3g}"


@requires_cuda
def test_replays_take_new_batches_and_draw_new_dropout_masks_cuda():
    """A replay reads the batch copied in (not the capture's), and the naive backend's dropout (the CUDA
    generator, registered with the graph) draws a new mask each replay."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(depth=10, growth_rate=4, drop_rate=0.5, backend="naive").cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)          # lr 0: the weights stay, only masks change
    (x, y), (x2, _) = _batches(torch.float32, "cuda")[:2]
    step = GraphedStep(model, opt, F.cross_entropy, x, y)
    first = step(x, y)[1].clone()
    assert not torch.equal(step(x, y)[1], first), "the same mask was replayed"
    assert not torch.equal(step(x2, y)[1], step(x, y)[1])


def test_what_cannot_be_captured_is_refused_in_one_line():
    model = _model("naive", torch.float32, "cpu")
    x, y = _batches(torch.float32, "cpu")[0]
    opt, _ = _optimizer(model, "cpu")
    with pytest.raises(ValueError, match="fp16 needs a GradScaler"):
        GraphedStep(model, opt, F.cross_entropy, x, y, autocast=torch.float16, capture=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        GraphedStep(model, opt, F.cross_entropy, x, y, capture=True)
    with pytest.raises(ValueError, match="supports SGD, Adam, AdamW, got RMSprop"):
        make_capturable(torch.optim.RMSprop(model.parameters()), torch.device("cpu"))
    with pytest.raises(ValueError, match="dampening=0"):
        make_capturable(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1),
                        torch.device("cpu"))
    model.features.transition1.norm.momentum = None
    with pytest.raises(ValueError, match="transition1.norm: BatchNorm momentum=None"):
        GraphedStep(model, opt, F.cross_entropy, x, y, capture=False)
    model.features.transition1.norm.momentum = 0.1
    step = GraphedStep(model, opt, F.cross_entropy, x, y, warmup=1, capture=False)
    with pytest.raises(ValueError, match=r"batch shapes it was captured with: input \(4, 3, 8, 8\)"):
        step(x[:2], y[:2])


def test_make_capturable_keeps_one_lr_tensor_that_schedules_fill():
    model = _model("naive", torch.float32, "cpu")
    opt, sched = _optimizer(model, "cpu")
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dim() == 0 and opt.param_groups[0]["fused"]
    for _ in range(2):
        opt.step()                    # no gradients: nothing changes, but the scheduler sees a step first
        sched.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.01)
    adam = make_capturable(torch.optim.Adam(model.parameters(), lr=1e-3), torch.device("cpu"))
    assert adam.param_groups[0]["capturable"] and isinstance(adam.param_groups[0]["lr"], torch.Tensor)


def test_compiled_step_equals_eager_steps_cpu():
    """The torch.compile path's plumbing (``reduce-overhead`` only changes anything on CUDA): aot_eager on CPU,
    float64, against eager steps of a copy."""
    eager = _model("naive", torch.float64, "cpu")
    model = copy.deepcopy(eager)
    batches = _batches(torch.float64, "cpu")[:2]
    opt, _ = _optimizer(eager, "cpu")
    copt, _ = _optimizer(model, "cpu")
    step = compiled_step(model, copt, F.cross_entropy, backend="aot_eager", mode=None)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        ref = F.cross_entropy(eager(x), y)
        ref.backward()
        opt.step()
        loss, _ = step(x, y)
        assert rel_err(loss, ref) <= 1e-12
    for (name, a), b in zip(eager.state_dict().items(), model.state_dict().values()):
        assert rel_err(b, a) <= 1e-12 if a.is_floating_point() else torch.equal(a, b), name


# ------------------------------------------------------------------------------------ effdense-train --cuda-graphs

def _train(tmp_path, name: str, device: str, *extra: str) -> dict:
    from effdense import train
    out = tmp_path / name
    results = train.main(["--dataset", "synthetic", "--device", device, "--depth", "10", "--growth-rate", "4",
                          "--no-progress", "--epochs", "2", "--batch-size", "64", "--schedule", "cosine",
                          "--output-dir", str(out), *extra])
    return results if isinstance(results, dict) else json.loads((out / "results.json").read_text())


def test_train_cuda_graphs_says_in_one_line_where_it_cannot_run(tmp_path, capsys):
    from effdense import train
    with pytest.raises(SystemExit, match="--cuda-graphs: CUDA graphs need a CUDA device, got cpu"):
        train.main(["--dataset", "synthetic", "--device", "cpu", "--depth", "10", "--growth-rate", "4",
                    "--no-progress", "--epochs", "1", "--cuda-graphs", "--output-dir", str(tmp_path / "r")])


@requires_cuda
@pytest.mark.parametrize("backend", ["naive", "cpp", "triton"])
def test_train_with_cuda_graphs_equals_eager_training_cuda(tmp_path, backend, monkeypatch):
    """Two epochs of effdense-train (cosine schedule: the learning rate changes every step and must reach the
    graph) with and without --cuda-graphs: the same losses, accuracies and final weights."""
    if not _available(backend, "cuda", torch.float32):
        pytest.skip(backends.unavailable_reason(backend, torch.device("cuda"), torch.float32))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    flags = ["--backend", backend, "--deterministic"]
    eager, graphed = _train(tmp_path, "eager", "cuda", *flags), _train(tmp_path, "graphs", "cuda", *flags,
                                                                       "--cuda-graphs")
    assert graphed["test_loss"] == pytest.approx(eager["test_loss"], rel=CUDA_RTOL[torch.float32])
    logs = [json.loads((tmp_path / n / "log.json").read_text())["epochs"] for n in ("eager", "graphs")]
    for a, b in zip(*logs):
        assert a["lr"] == pytest.approx(b["lr"]) and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    weights = [torch.load(tmp_path / n / "last.pt", map_location="cpu", weights_only=False)["model"]
               for n in ("eager", "graphs")]
    for name, a in weights[0].items():
        b = weights[1][name]
        assert rel_err(b, a) <= CUDA_RTOL[torch.float32] if a.is_floating_point() else torch.equal(a, b), name
