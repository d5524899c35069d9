"""``bash benchmarks/gpu_run.sh --rehearse``: the GPU command's phases on CPU at tiny sizes, so that the one call a
lent GPU gets cannot fail on a typo, a missing file or an argument the scripts no longer accept (issue 14).

One run (about 2 minutes on an idle 2-core machine, at most 240 s by the script's own overall deadline):
it exits 0; every phase ran and none failed; every benchmark phase measured at least one row for each backend it
names (a row may say the backend is unavailable on CPU): a phase that only proves its arguments parse fails;
what comes back is at most 8 files no deeper than two folders; the results tarball holds every suite's results;
the rehearsal's few real tests passed."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
#: the phases in their order, and the suite each benchmark phase runs
PHASES = {"setup": None, "correctness": None, "speed-bc100-b64": "speed", "memory": "memory", "compile": "speed",
          "inference": "inference", "budgets": "speed", "capacity": "capacity", "densenet121": "speed",
          "speed-bc100-b256": "speed", "peers": "peers", "kernels": "kernels", "launches": "launches"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_run")
    env = dict(os.environ, OUT=str(tmp / "out"), TMPDIR=str(tmp))
    env.pop("EFFDENSE_SESSION", None)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "--rehearse"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc, tmp / "out", time.monotonic() - t0


def test_rehearsal_exits_cleanly_within_its_deadline(rehearsal):
    proc, out, wall = rehearsal
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert wall < 260, f"the rehearsal took {wall:.0f} s (its overall deadline is 240 s plus packing)"
    assert "phase" in proc.stdout and "result files" in proc.stdout, "the summary table ends the output"


def test_what_comes_back_fits_the_device_tool(rehearsal):
    _, out, _ = rehearsal
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 3 <= len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    names = {p.name for p in files}
    assert {"gpu_run.log", "gpu_run.json"} <= names and any(n.startswith("results-cpu") for n in names), names
    log = (out / "gpu_run.log").read_text()
    assert "effdense   " in log and "backend    device" in log, "python -m effdense.info goes into the log"


def test_every_phase_ran_and_none_failed(rehearsal):
    _, out, _ = rehearsal
    summary = json.loads((out / "gpu_run.json").read_text())
    assert summary["rehearsal"] is True and summary["commit"]
    phases = {p["name"]: p for p in summary["phases"]}
    assert list(phases) == list(PHASES)
    bad = {n: p for n, p in phases.items() if p["status"] not in ("ok", "timeout")}
    assert not bad, f"phases that failed or were skipped: {bad}"
    assert all(p["seconds"] <= p["deadline"] + 12 for p in phases.values()), phases


def test_every_suite_left_its_results(rehearsal):
    _, out, _ = rehearsal
    (tgz,) = out.glob("results-*.tgz")
    with tarfile.open(tgz) as tar:
        members = [m.name for m in tar.getmembers() if m.name.endswith(".json")]
        data = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    suites = [d["suite"] for d in data]
    for suite in set(PHASES.values()) - {None}:
        assert suites.count(suite) == list(PHASES.values()).count(suite), (suite, members)
    for name, d in zip(members, data):  # every phase produced rows: one per backend it names, at least
        assert d["rows"], f"{name} ({d['suite']}) has no rows: the phase measured nothing"
        if d["suite"] in ("speed", "memory", "launches"):
            missing = set(d["backends"]) - {r.get("backend") for r in d["rows"]}
            assert not missing, f"{name} ({d['suite']}) has no row for {sorted(missing)}"
    sessions = {d["env"]["session"] for d in data}
    assert len(sessions) == 1 and sessions.pop().startswith("gpu_run-"), "one session for benchmarks.report"
    assert all(d["env"]["commit"] for d in data)


def test_the_correctness_selection_collects_and_its_real_tests_pass(rehearsal):
    _, out, _ = rehearsal
    summary = json.loads((out / "gpu_run.json").read_text())
    correctness = next(p for p in summary["phases"] if p["name"] == "correctness")
    log = (out / "gpu_run.log").read_text()
    assert "tests collected" in log and "no tests collected" not in log
    if correctness["status"] == "ok":
        assert summary["tests"]["tests"] > 0 and not summary["tests"]["failed"], summary["tests"]
