"""Multi-process training through ``torchrun --nproc_per_node 2`` on CPU (gloo)."""
import os
import signal
import subprocess
import sys

import pytest
import torch.distributed as dist

from effdense.train import checkpoints as checkpoint_io

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--dataset", "synthetic", "--device", "cpu", "--depth", "10", "--growth-rate", "4", "--no-progress",
        "--backend", "naive", "--max-steps", "3"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def launch(out, *extra, nproc=2):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "effdense.train", *ARGS, "--output-dir", str(out), *extra]
    if nproc > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "effdense.train"]
    # a session of its own: on a timeout the launcher and its workers are killed together, none left spinning
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran over 300 s: {stdout[-2000:]}{stderr[-2000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout, checkpoint_io.load(os.path.join(out, "last.pt"))["model"]


def max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("backend", ["torch", "checkpoint"])
def test_sync_bn_equals_one_process(tmp_path, backend):
    """torch: the block's shared statistics (and their gradient sums) span both processes; checkpoint: the
    recomputation normalizes with the synchronized statistics too."""
    _, synced = launch(tmp_path / "sync", "--sync-bn", "--backend", backend)
    _, single = launch(tmp_path / "single", "--backend", backend, nproc=1)
    assert max_diff(synced, single) < 1e-3


def test_ddp_replicas_agree_and_sync_bn_equals_one_process(tmp_path):
    stdout, ddp = launch(tmp_path / "ddp")
    assert "parameters identical on all 2 processes" in stdout and "2 process(es)" in stdout
    assert stdout.count("test accuracy") == 1  # only process 0 prints and writes
    _, synced = launch(tmp_path / "sync", "--sync-bn")
    _, single = launch(tmp_path / "single", nproc=1)
    # each process took 32 of the 64 images; with global batch statistics that is one process on all 64
    assert max_diff(synced, single) < 1e-3
    assert max_diff(ddp, single) > 1e-2  # local statistics differ, and the test can tell
