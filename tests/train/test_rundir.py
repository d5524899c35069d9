"""A run's --output-dir is its own: a rerun without --resume refuses, --overwrite clears the old run's files, a lock
keeps a second process out (a stale one is taken over), and a folder that cannot take checkpoints fails before the
first step, in one line."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from effdense import train
from effdense.train import checkpoints as checkpoint_io
from effdense.train import rundir
from effdense.train import run as run_module
from effdense.train.model import build_model
from utils import one_thread  # noqa: F401 - a fixture

TINY = ["--dataset", "synthetic", "--depth", "10", "--growth-rate", "4", "--batch-size", "16", "--epochs", "1",
        "--max-steps", "2", "--no-progress", "--device", "cpu", "--backend", "torch"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run(out, *extra):
    return train.main([*TINY, "--output-dir", str(out), *extra])


def one_line_exit(out, *extra) -> str:
    with pytest.raises(SystemExit) as err:
        run(out, *extra)
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg and msg.startswith("effdense-train: "), msg
    return msg


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a training step runs."""
    monkeypatch.setattr(run_module, "train_step", lambda *a: pytest.fail("a training step ran"))


def write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / rundir.LOCK).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "x"}))


def test_rerun_refuses_overwrite_clears_resume_continues(tmp_path, monkeypatch):
    """The issue's case: a second run into the same folder kept last.pt of one run beside best.pt and log.csv of
    another. Now it refuses; --overwrite deletes every file of the old run; --resume continues."""
    out = tmp_path / "run"
    run(out)
    assert checkpoint_io.load(out / "last.pt")["global_step"] == 2 and not (out / rundir.LOCK).exists()
    for name in ("best.pt", "log.csv", "log.json", "curves.png", "tb/events"):  # files of an older, longer run
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text("old")
    (out / "notes.txt").write_text("mine")
    before = (out / "last.pt").read_bytes()
    msg = one_line_exit(out, "--max-steps", "1")
    assert msg == (f"effdense-train: --output-dir {out} holds another run's files (last.pt, best.pt, log.csv, "
                   "log.json, results.json, curves.png, tb): continue that run with --resume, choose another "
                   "--output-dir, or pass --overwrite to delete them")
    assert (out / "last.pt").read_bytes() == before and not (out / rundir.LOCK).exists()
    run(out, "--max-steps", "1", "--overwrite")
    assert sorted(os.listdir(out)) == ["last.pt", "notes.txt", "results.json"]  # nothing of the old run is left
    assert checkpoint_io.load(out / "last.pt")["global_step"] == 1
    run(out, "--max-steps", "2", "--resume")
    assert checkpoint_io.load(out / "last.pt")["global_step"] == 2 and not (out / rundir.LOCK).exists()


def test_overwrite_with_resume_is_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--overwrite", "--resume")
    assert "--overwrite starts a new run" in capsys.readouterr().err


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_folder_in_use_by_a_live_process_refuses(tmp_path, live_process, no_compute):
    """A second run into a folder a running process holds: one line naming the process, its host and the lock."""
    write_lock(tmp_path, live_process.pid)
    msg = one_line_exit(tmp_path)
    assert msg == (f"effdense-train: {tmp_path} is in use by another run (process {live_process.pid} on "
                   f"{socket.gethostname()}, lock {tmp_path / rundir.LOCK}); wait for it, or choose another "
                   "--output-dir")
    assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == live_process.pid  # left to its owner


def test_another_hosts_lock_and_an_unreadable_lock_refuse(tmp_path, no_compute):
    write_lock(tmp_path, 1, host="elsewhere.example")
    assert "(process 1 on elsewhere.example, lock" in one_line_exit(tmp_path)
    (tmp_path / rundir.LOCK).write_text("")
    assert "is unreadable: being written, or left by a killed process" in one_line_exit(tmp_path)


def test_a_stale_lock_is_taken_over_and_released(tmp_path, capsys):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    write_lock(tmp_path, ended.pid)
    lock = rundir.claim(str(tmp_path), resume=False, overwrite=False)
    assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == os.getpid()
    assert f"took over the stale lock {tmp_path / rundir.LOCK} of process {ended.pid}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="is in use by another run"):  # held: a second claim in this process
        rundir.claim(str(tmp_path), resume=False, overwrite=False)
    lock.release()
    assert not (tmp_path / rundir.LOCK).exists()


def test_the_lock_goes_when_the_run_is_interrupted(tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "train_step", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    assert not (tmp_path / rundir.LOCK).exists()


@pytest.mark.parametrize("where,expected", [
    ("/dev/null/x", "--output-dir /dev/null/x cannot be created (Not a directory: /dev/null/x); expected a folder"),
    ("FILE/run", "--output-dir FILE/run cannot be created (Not a directory: FILE/run)"),
    ("/proc", "--output-dir /proc cannot be written ("),
    ("READONLY", "--output-dir READONLY cannot be written (Permission denied)"),
])
def test_a_folder_that_cannot_be_written_fails_before_the_data(tmp_path, monkeypatch, where, expected):
    """Before: an OSError traceback from os.makedirs, or from the first save after an epoch's compute."""
    monkeypatch.setattr(run_module, "load_dataset", lambda *a, **k: pytest.fail("the dataset was loaded"))
    (tmp_path / "FILE").write_text("a file where a folder is expected")
    if where == "READONLY":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("permissions do not stop this user (root)")
    path = where.replace("FILE", str(tmp_path / "FILE")).replace("READONLY", str(tmp_path / "ro"))
    expected = expected.replace("FILE", str(tmp_path / "FILE")).replace("READONLY", str(tmp_path / "ro"))
    assert one_line_exit(path).startswith(f"effdense-train: {expected}")


def test_too_little_disk_space_fails_before_the_first_step(tmp_path, monkeypatch, no_compute):
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**30, 2**30 - 2**20, 2**20))
    msg = one_line_exit(tmp_path)
    assert msg.startswith(f"effdense-train: --output-dir {tmp_path} has 1.0 MiB free, but the run needs about ")
    need, each = re.search(r"needs about ([\d.]+) MiB \(last.pt, best.pt and a temporary copy of ([\d.]+) KiB "
                           r"each, plus 16.0 MiB for logs\)$", msg).groups()
    assert float(need) == pytest.approx(3 * float(each) / 1024 + 16, abs=0.06)
    assert not (tmp_path / rundir.LOCK).exists() and not (tmp_path / "last.pt").exists()


def test_a_file_size_limit_below_a_checkpoint_fails_at_start(tmp_path, monkeypatch, no_compute):
    monkeypatch.setattr(rundir.resource, "getrlimit", lambda which: (4096, rundir.resource.RLIM_INFINITY))
    assert "the file-size limit (ulimit -f) of 4.0 KiB is below a checkpoint's predicted" in one_line_exit(tmp_path)


def test_predicted_checkpoint_size_is_what_is_saved(tmp_path):
    """The prediction (parameters, buffers, momentum) is within a small header of last.pt's size, from below."""
    run(tmp_path)
    ckpt = checkpoint_io.load(tmp_path / "last.pt")
    model = build_model(ckpt["model_spec"], "torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    predicted, saved = rundir.checkpoint_bytes(model, opt, 0.9), os.path.getsize(tmp_path / "last.pt")
    assert predicted <= saved <= predicted + rundir.MARGIN
    assert rundir.checkpoint_bytes(model, opt, 0.0) < predicted
