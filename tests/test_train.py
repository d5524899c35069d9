"""The training command on CPU: arguments, presets, outputs, exact resume, atomic checkpoints, OOM handling."""
import json
import os

import pytest
import torch

from effdense import backends, checkpoint_io, train
from effdense.backends import bn
from effdense import eval as eval_cli
from effdense.models import densenet_cifar

# an explicit backend: under pytest without a GPU, "auto" may pick Triton's (slow) interpreter
TINY = ["--dataset", "synthetic", "--device", "cpu", "--depth", "10", "--growth-rate", "4", "--no-progress",
        "--backend", "torch"]
STEPS_PER_EPOCH = (256 - 64) // 64  # synthetic: 256 training images, 64 held out, batch 64

@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the numbers below were measured so, and busy CI cores do not stall spinning threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def run(out, *extra):
    return train.main([*TINY, "--output-dir", str(out), *extra])


def weights(path):
    return checkpoint_io.load(path)["model"]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-0.1"], "argument --lr: must be > 0, got -0.1"),
    (["--epochs", "0"], "argument --epochs: must be > 0"),
    (["--depth", "11"], "argument --depth: depth 11 does not fit a DenseNet-BC/B (bottleneck) with 3 blocks: "
                        "depth must be 6*N + 4 for N >= 1 (10, 16, 22, 28, ...)"),
    (["--depth", "12", "--no-bottleneck"], "depth must be 3*N + 4"),
    (["--arch", "densenet99"], "unknown model 'densenet99'; valid models: densenet121"),
    (["--arch", "resnet50", "--depth", "40"], "not both"),
    (["--arch", "vgg16", "--drop-rate", "0.2"], "--drop-rate do not apply to --arch vgg16"),
    (["--compression", "1.5"], "argument --compression: must be in (0, 1.0]"),
    (["--backend", "fast"], "invalid choice: 'fast'"),
    (["--amp", "fp8"], "choose from 'bf16', 'fp16'"),
    (["--compile", "fast"], "argument --compile: unknown torch.compile backend 'fast'; known: aot_eager"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        train.parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_paper_defaults_and_presets():
    a = train.parse_args([])
    assert (a.dataset, a.arch, a.epochs, a.batch_size, a.lr, a.momentum, a.weight_decay, a.schedule, a.val_size) == \
        ("cifar10", "densenet_bc_100_k12", 300, 64, 0.1, 0.9, 1e-4, "step", 5000)
    assert a.backend == "auto" and a.output_dir == os.path.join("runs", "cifar10-densenet_bc_100_k12")
    d = train.parse_args(["--dataset", "digits"])
    assert d.arch == train.CUSTOM and (d.depth, d.growth_rate, d.bottleneck) == (16, 8, True)
    assert (d.epochs, d.batch_size, d.schedule, d.lr) == (15, 32, "cosine", 0.1)
    c = train.parse_args(["--dataset", "digits", "--depth", "40", "--no-bottleneck", "--epochs", "3"])
    assert (c.depth, c.growth_rate, c.bottleneck, c.epochs) == (40, 12, False, 3)
    assert train.parse_args(["--dataset", "digits", "--arch", "lenet5"]).depth is None
    assert train.parse_args(["--schedule", "cosine"]).schedule == "cosine"


def test_schedules():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = train.make_scheduler(opt, "step", 300)
    lrs = []
    for _ in range(300):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[149] == 0.1 and lrs[150] == pytest.approx(0.01) and lrs[224] == pytest.approx(0.01)
    assert lrs[225] == pytest.approx(0.001) and lrs[299] == pytest.approx(0.001)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = train.make_scheduler(opt, "cosine", 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_list_models(capsys):
    assert train.main(["--list-models"]) == 0
    out = capsys.readouterr().out
    for name in ("densenet121", "densenet_bc_100_k12", "lenet5", "alexnet", "zfnet", "vgg16", "vgg19", "googlenet",
                 "resnet50"):
        assert f"  {name} " in out


def test_run_outputs_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--epochs", "2", "--drop-rate", "0.1") == 0
    stdout = capsys.readouterr().out
    assert "parameters: " in stdout and "FLOPs per image" in stdout and "activation memory" in stdout
    assert "epoch        lr train loss" in stdout and "test accuracy:" in stdout
    for name in ("last.pt", "best.pt", "log.csv", "log.json", "results.json"):
        assert (out / name).is_file(), name
    try:
        import matplotlib  # noqa: F401
        assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    except ImportError:
        pass
    lines = (out / "log.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,lr,train_loss,train_acc,val_loss,val_acc") and len(lines) == 3
    log = json.loads((out / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2] and log["config"]["dataset"] == "synthetic"
    ckpt = checkpoint_io.load(out / "last.pt")
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "model_spec"} <= ckpt.keys()
    assert {"python", "numpy", "torch"} <= ckpt["rng"][0].keys() and ckpt["epoch"] == 2
    results = json.loads((out / "results.json").read_text())
    env = results["environment"]
    assert env == log["config"]["environment"] and env["torch"] == torch.__version__ and env["device_type"] == "cpu"
    assert env["command"].startswith("effdense-train --dataset synthetic") and "--drop-rate 0.1" in env["command"]
    assert eval_cli.main([str(out / "last.pt"), "--json", "--device", "cpu", "--backend", "torch"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(results["test_acc"]) and evaluated["images"] == 128


@pytest.mark.parametrize("flags", [["--amp", "bf16"], ["--channels-last"], ["--amp", "bf16", "--channels-last"],
                                   ["--deterministic"]], ids=" ".join)
def test_precision_and_layout_flags_train(tmp_path, flags):
    out = tmp_path / "run"
    assert run(out, "--epochs", "1", "--max-steps", "2", *flags) == 0
    assert "test_acc" in json.loads((out / "results.json").read_text())
    assert all(torch.isfinite(v).all() for v in weights(out / "last.pt").values() if v.is_floating_point())


def test_compile_flag_trains_the_same_weights(tmp_path, monkeypatch):
    """``--compile BACKEND`` wraps the model in ``torch.compile``; aot_eager traces the whole step (the blocks'
    autograd functions included) without changing a number. Inductor is checked in test_compile.py."""
    assert train.parse_args([*TINY, "--compile"]).compile == "inductor"
    calls, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or real(model, **kw))
    run(tmp_path / "eager", "--epochs", "1", "--max-steps", "2")
    run(tmp_path / "compiled", "--epochs", "1", "--max-steps", "2", "--compile", "aot_eager")
    assert calls == [{"backend": "aot_eager"}]
    assert_same(weights(tmp_path / "eager" / "last.pt"), weights(tmp_path / "compiled" / "last.pt"))


def test_resume_is_exact(tmp_path):
    """A run stopped at the end of epoch 1, or inside it, and resumed ends bit-identical to an uninterrupted run."""
    flags = ["--epochs", "2", "--drop-rate", "0.2"]
    run(tmp_path / "full", *flags)
    full = checkpoint_io.load(tmp_path / "full" / "last.pt")
    for stop_after in (STEPS_PER_EPOCH, 2):
        out = tmp_path / f"split{stop_after}"
        run(out, *flags, "--max-steps", str(stop_after))
        assert checkpoint_io.load(out / "last.pt")["global_step"] == stop_after
        run(out, *flags, "--resume")
        split = checkpoint_io.load(out / "last.pt")
        assert_same(full["model"], split["model"])
        assert torch.equal(full["optimizer"]["state"][0]["momentum_buffer"],
                           split["optimizer"]["state"][0]["momentum_buffer"])
        assert [r["train_loss"] for r in full["history"]] == [r["train_loss"] for r in split["history"]]


def test_resume_rejects_other_model(tmp_path):
    run(tmp_path, "--max-steps", "1")
    with pytest.raises(SystemExit, match="resume with the flags of the original run"):
        run(tmp_path, "--depth", "16", "--resume")


def test_atomic_save_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint_io.atomic_save({"model": {"w": torch.ones(2)}}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_io.atomic_save({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(weights(path)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["last.pt"]
    path.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="last.pt is unreadable"):
        checkpoint_io.load(path)


def test_out_of_memory_message_and_intact_checkpoint(tmp_path, monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = {"train": 0}

    def flaky(logits, target, *args, **kwargs):
        if kwargs.get("reduction", "mean") == "mean":
            calls["train"] += 1
            if calls["train"] == STEPS_PER_EPOCH + 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(logits, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", flaky)
    with pytest.raises(SystemExit) as err:
        run(tmp_path, "--epochs", "3", "--backend", "naive")
    msg = str(err.value)
    assert "out of memory" in msg and "smaller --batch-size" in msg and "memory-efficient backend" in msg
    assert "last.pt is intact; continue with --resume" in msg
    assert checkpoint_io.load(tmp_path / "last.pt")["epoch"] == 1


def test_sync_bn_with_a_backend_lacking_it_names_the_gap(monkeypatch):
    fake = backends.Backend("nosync", "no cross-process statistics", True, lambda x, layers: x,
                            lambda dev, dt: None)
    monkeypatch.setitem(backends.BACKENDS, "nosync", fake)
    model = densenet_cifar(depth=10, growth_rate=4, backend="nosync")
    try:
        with pytest.raises(NotImplementedError, match="--sync-bn: backend 'nosync' cannot run .*not implemented here"):
            train.convert_sync_bn(model, torch.device("cpu"), fake)
        assert not bn.sync_stats_enabled()
    finally:
        bn.disable_sync_stats()


#: this command measured 86.9% test accuracy (CPU, one thread); the README states the 80% floor
DIGITS_THRESHOLD = 0.80


def test_short_digits_run_reaches_threshold(tmp_path):
    """The offline quickstart dataset really trains: a short run on scikit-learn's digits beats a stated accuracy."""
    pytest.importorskip("sklearn")
    argv = ["--dataset", "digits", "--device", "cpu", "--epochs", "4", "--val-size", "0", "--depth", "10",
            "--growth-rate", "8", "--backend", "naive", "--no-progress", "--output-dir", str(tmp_path)]
    assert train.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["epochs_done"] == 4
    assert results["test_acc"] >= DIGITS_THRESHOLD, results
