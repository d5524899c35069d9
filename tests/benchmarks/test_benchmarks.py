"""The benchmark harness in --quick mode on CPU: every suite writes schema-valid JSON with numbers for every
requested backend, and the README generator round-trips a stored results file."""
from __future__ import annotations

import glob
import json
import os
import pathlib
import shutil

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import report
from benchmarks.suites import SUITES

FIXTURE = pathlib.Path(__file__).parent.parent / "fixtures" / "bench_results"
BACKENDS = ["naive", "torch"]
ENV_KEYS = {"device_type", "device", "torch", "triton", "cuda", "commit", "dirty", "command", "timestamp",
            "tf32_matmul", "tf32_cudnn", "python", "threads", "loadavg", "loadavg_end", "precision"}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert cli.main(["--quick", "--device", "cpu", "--backends", *BACKENDS, "--out", str(out)]) == 0
    files = glob.glob(str(out / "*" / "*.json"))
    return {json.loads(pathlib.Path(f).read_text())["suite"]: json.loads(pathlib.Path(f).read_text())
            for f in files}


def test_every_suite_wrote_schema_valid_json(quick_results):
    assert set(quick_results) == set(SUITES)
    for suite, data in quick_results.items():
        assert data["schema"] == 1 and data["suite"] == suite and data["quick"] is True
        assert ENV_KEYS <= set(data["env"]), suite
        assert data["backends"] == BACKENDS
        assert isinstance(data["rows"], list) and data["rows"], suite
        assert all("status" in r for r in data["rows"]), suite
        assert set(data["units"]) >= {"peak_bytes", "step_ms"}


@pytest.mark.parametrize("suite,fields", [("memory", ["peak_bytes", "floor_bytes"]),
                                          ("speed", ["forward_ms", "backward_ms", "step_ms", "images_per_s",
                                                     "peak_bytes"])])
def test_every_requested_backend_produced_numbers(quick_results, suite, fields):
    rows = quick_results[suite]["rows"]
    for backend in BACKENDS:
        mine = [r for r in rows if r["backend"] == backend]
        assert mine and all(r["status"] == "ok" for r in mine), (backend, mine)
        for r in mine:
            assert all(isinstance(r[f], (int, float)) and r[f] > 0 for f in fields), r


def test_kernels_suite_reports_ceilings_and_roofline(quick_results):
    rows = quick_results["kernels"]["rows"]
    assert {r["name"] for r in rows if r["kind"] == "ceiling"} >= {"copy", "matmul-fp32"}
    roof = [r for r in rows if r["kind"] == "roofline"]
    assert {r["backend"] for r in roof} == set(BACKENDS)
    assert all(r["over_floor"] > 0 and r["step_flops"] > 0 for r in roof)
    from effdense import _ext
    conv = [r for r in rows if r["kind"] == "conv3x3"]
    impls = {"unfused-torch", "cpp-fused"} if _ext.available() else {"unfused-torch"}
    assert {(r["impl"], r["name"]) for r in conv} == {(i, d) for i in impls for d in ("forward", "backward")}
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0 for r in conv), conv


def test_cuda_only_suites_say_why_on_cpu(quick_results):
    assert quick_results["capacity"]["rows"][0]["status"].startswith("skipped: needs CUDA")


def _parse_tables(markdown: str) -> list[list[dict]]:
    tables, current, header = [], None, None
    for line in markdown.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if current is None:
                header, current = cells, []
                tables.append(current)
            else:
                current.append(dict(zip(header, cells)))
        elif not line.startswith("|---"):
            current = None
    return tables


def test_results_record_threads_load_and_precision(quick_results):
    for suite, data in quick_results.items():
        env = data["env"]
        assert env["threads"] >= 1 and len(env["loadavg"]) == len(env["loadavg_end"]) == 3, suite
        prec = env["precision"]
        assert {"cudnn_allow_tf32", "cuda_matmul_allow_tf32"} <= set(prec), prec
        assert prec["cudnn_allow_tf32"] == env["tf32_cudnn"] and prec["fp32_dot"] in ("ieee", "tf32"), prec


def test_speed_rounds_are_interleaved_with_their_spread(quick_results):
    data = quick_results["speed"]
    rounds = data["config"]["rounds"]
    for r in data["rows"]:
        per_round = r["step_ms_rounds"]
        assert len(per_round) == rounds and r["variant"] == "eager", r
        assert r["step_ms_min"] <= r["step_ms_q1"] <= r["step_ms"] <= r["step_ms_q3"] <= r["step_ms_max"], r
        assert r["step_ms"] == pytest.approx(sorted(per_round)[rounds // 2]) and r["first_step_s"] > 0
    table = report.suite_markdown(data)
    assert "step min-max" in table and "first step s" in table


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_rss_rise_counts_the_pages_a_step_touches_and_not_the_ones_it_left(quick_results):
    """rss_step_bytes sees 64 MiB that a step writes, and not 64 MiB an earlier step allocated and freed; the speed
    suite records it on CPU for eager rows, from a fresh process, with glibc's defaults and a fixed mmap threshold."""
    from benchmarks.rss import rss_step_bytes
    mib = 2 ** 20

    def touch():
        buf = torch.ones(64 * mib // 4)
        del buf

    assert rss_step_bytes(touch) >= 60 * mib
    assert rss_step_bytes(lambda: None) < 8 * mib
    for r in quick_results["speed"]["rows"]:
        for suffix in ("", "_fixed_mmap"):
            assert r[f"rss_step_bytes{suffix}"] >= 0 and r[f"rss_peak_bytes{suffix}"] > 0, r


def test_launches_suite_counts_every_backend_triton_in_a_dry_run(tmp_path):
    from effdense import backends
    interpreter = backends.unavailable_reason("triton", torch.device("cpu"), torch.float32) is None
    wanted = ["naive", "torch"] + (["triton"] if interpreter else [])
    assert cli.main(["--quick", "--suite", "launches", "--device", "cpu", "--backends", *wanted,
                     "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*/launches-*.json")
    data = json.loads(path.read_text())
    rows = {r["backend"]: r for r in data["rows"]}
    assert set(rows) == set(wanted) and all(r["status"] == "ok" for r in rows.values())
    assert rows["naive"]["vs_naive"] == 1.0 and rows["naive"]["triton"] == 0
    for r in rows.values():
        assert r["launches"] == r["aten"] + r["triton"] > 0 and r["top_ops"][0][1] > 0, r
        assert r["block_ranges"] == 6, "3 dense blocks, forward and backward ranges each"
    if "triton" in rows:
        assert rows["triton"]["triton"] > 0 and rows["triton"]["triton_dry_run"] is True
    table = _parse_tables(report.suite_markdown(data))[0]
    assert [t["backend"] for t in table] == wanted and table[0]["vs naive"] == "1.00x"
    assert table[1]["launches"] == str(rows["torch"]["launches"]) and "syncs, dropout on" in table[1]


def test_quick_runs_go_to_a_scratch_folder_unless_asked(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    monkeypatch.setattr(cli, "QUICK_RESULTS", str(scratch))
    tracked = set(glob.glob(os.path.join(cli.RESULTS, "*", "*")))
    assert cli.main(["--quick", "--suite", "capacity", "--device", "cpu", "--backends", "naive"]) == 0
    assert len(list(scratch.glob("*/capacity-*.json"))) == 1
    assert set(glob.glob(os.path.join(cli.RESULTS, "*", "*"))) == tracked, "a quick run wrote into benchmarks/results"


def _stored_as_full_run(src: pathlib.Path, dst: pathlib.Path) -> None:
    """The fixture is a quick run's result; the README is made from full runs only: store it as one."""
    shutil.copytree(src, dst)
    for path in dst.glob("*/*.json"):
        data = json.loads(path.read_text())
        data["quick"] = False
        path.write_text(json.dumps(data))


def test_report_never_lets_quick_results_into_the_readme_or_a_full_summary(tmp_path, capsys):
    results = tmp_path / "results"
    _stored_as_full_run(FIXTURE, results)
    (full,) = results.glob("*/memory-*.json")
    quick = json.loads(full.read_text())
    quick.update(quick=True, rows=[dict(r, peak_bytes=1) for r in quick["rows"]])
    quick["env"]["timestamp"] = "2999-01-01T00:00:00Z"           # newer than the full result
    (full.parent / "memory-quick.json").write_text(json.dumps(quick))
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.END}\n")
    report.main(["--results", str(results), "--readme", str(readme)])
    assert "2999-01-01" not in readme.read_text() and "(quick)" not in readme.read_text()
    assert "2999-01-01" not in (full.parent / "summary.md").read_text()
    summary = (full.parent / "summary.md").read_text()
    report.main(["--results", str(results), "--include-quick"])
    assert (full.parent / "summary.md").read_text() == summary, "quick results replaced a full summary"
    assert "2999-01-01" in capsys.readouterr().out, "--include-quick prints them"
    with pytest.raises(SystemExit):
        report.main(["--results", str(results), "--readme", str(readme), "--include-quick"])
    assert "--include-quick cannot be combined with --readme" in capsys.readouterr().err


def test_report_merges_the_newest_sessions_runs_of_a_suite(tmp_path):
    """benchmarks/gpu_run.sh runs the speed suite four times in one session: one table, every row, every command;
    a run stopped before its first row adds nothing, an older session's run is not mixed in."""
    stored = json.loads(next(FIXTURE.glob("*/memory-*.json")).read_text())
    folder = tmp_path / "results" / "cuda-x"
    folder.mkdir(parents=True)

    def write(name, session, timestamp, rows, complete=True):
        env = dict(stored["env"], session=session, timestamp=timestamp, command=f"run {name}")
        (folder / f"memory-{name}.json").write_text(json.dumps(dict(stored, quick=False, env=env, rows=rows,
                                                                    complete=complete)))
    write("old", "s0", "2026-01-01T00:00:00Z", stored["rows"][:1])
    write("a", "s1", "2026-01-02T00:00:00Z", stored["rows"][:2])
    write("b", "s1", "2026-01-02T00:01:00Z", stored["rows"][2:3], complete=False)
    write("c", "s1", "2026-01-02T00:02:00Z", [])
    merged = report.newest(str(tmp_path / "results"))["cuda-x"]["memory"]
    assert merged["rows"] == stored["rows"][:3]
    assert [r["command"] for r in merged["runs"]] == ["run a", "run b"] and merged["runs"][1]["complete"] is False
    text = report.suite_markdown(merged)
    assert "`run a`" in text and "`run b`" in text and "(incomplete" in text


def test_report_documents_its_options(capsys):
    with pytest.raises(SystemExit):
        report.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--results", "--readme", "--plots", "--include-quick"):
        assert option in text
    assert "quick" in text and "summary.md" in text


def test_readme_generator_round_trips_a_stored_result(tmp_path):
    results = tmp_path / "results"
    _stored_as_full_run(FIXTURE, results)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{report.START}\nold text\n{report.END}\n\nrest\n")
    report.main(["--results", str(results), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro") and text.rstrip().endswith("rest") and "old text" not in text
    stored = json.loads(next(results.glob("*/memory-*.json")).read_text())
    assert stored["env"]["command"] in text and stored["env"]["commit"][:10] in text
    table = next(t for t in _parse_tables(text) if t and "peak MiB" in t[0])
    assert len(table) == len(stored["rows"])
    for parsed, row in zip(table, stored["rows"]):
        assert parsed["backend"] == row["backend"] and int(parsed["depth"]) == row["depth"]
        assert float(parsed["peak MiB"]) == pytest.approx(row["peak_bytes"] / 2 ** 20, abs=0.05)
        assert float(parsed["floor MiB"]) == pytest.approx(row["floor_bytes"] / 2 ** 20, abs=0.05)
    report.main(["--results", str(results), "--readme", str(readme)])
    assert readme.read_text() == text, "regenerating must be idempotent"
    assert os.path.exists(results / stored_folder(results) / "summary.md")


def stored_folder(results: pathlib.Path) -> str:
    return next(p.parent.name for p in results.glob("*/memory-*.json"))


def test_training_run_is_recorded_and_listed(tmp_path):
    """``python -m benchmarks.runs`` keeps a finished run's logs (not its checkpoints) beside the benchmark
    results, and the README section lists it from those files."""
    from benchmarks import runs
    from effdense import train

    run_dir, results = tmp_path / "run", tmp_path / "results"
    assert train.main(["--dataset", "synthetic", "--device", "cpu", "--depth", "10", "--growth-rate", "4",
                       "--backend", "torch", "--epochs", "1", "--no-progress", "--output-dir", str(run_dir)]) == 0
    console = tmp_path / "console.txt"
    console.write_text("the console output\n")
    with pytest.raises(SystemExit, match="finished effdense-train run"):
        runs.main([str(tmp_path), "--results", str(results)])
    assert runs.main([str(run_dir), "--console", str(console), "--results", str(results)]) == 0
    (folder,) = results.glob("cpu-*/train-synthetic-densenet_bc_10_k4-*")
    kept = {p.name for p in folder.iterdir()}
    assert {"results.json", "log.json", "log.csv", "console.log"} <= kept and not any(".pt" in k for k in kept)
    with pytest.raises(FileExistsError, match="recorded already"):
        runs.record(str(run_dir), str(results))
    assert not list(results.glob("*/.run-*")), "no half-written folder is left behind"

    stored = json.loads((folder / "results.json").read_text())
    text = report.section(str(results), str(tmp_path))
    row = next(line for line in text.splitlines() if line.startswith("| synthetic |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["synthetic", "densenet_bc_10_k4", "torch", "1", f"{stored['test_acc']:.2%}"]
    env = stored["environment"]
    assert env["command"] in text and (env["commit"] or "unknown")[:10] in cells[9]
    minutes = sum(e["seconds"] for e in json.loads((folder / "log.json").read_text())["epochs"]) / 60
    assert cells[6] == f"{minutes:.1f}" and cells[7] == str(env["threads"]) == str(torch.get_num_threads())
    assert cells[8].startswith(env["cpu"] + " (cpu, torch "), "the CPU's model names the device of a CPU run"


def test_environment_record_names_the_commit(monkeypatch):
    from effdense.tools import info
    env = info.environment(torch.device("cpu"), ["prog", "--flag", "a b"])
    assert env["command"] == "prog --flag 'a b'" and env["torch"] == torch.__version__
    assert (env["commit"] is None) == (env["dirty"] is None)
    assert env["cpu"] == info.cpu_model() and env["cpu"]
    if pathlib.Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        assert not names or env["cpu"] == names[0], "the model name from /proc/cpuinfo, not just the architecture"
    if (pathlib.Path(info.__file__).resolve().parents[2] / ".git").exists() and shutil.which("git"):
        assert env["commit"], "run from a git checkout, the commit is recorded (info.SOURCE_ROOT is the checkout)"
    monkeypatch.setenv("EFFDENSE_COMMIT", "0123456789abcdef")    # a copy without .git (the GPU machine)
    env = info.environment(torch.device("cpu"))
    assert env["commit"] == "0123456789abcdef" and env["dirty"] is None


def test_loader_suite_measures_images_per_worker_or_names_the_extra():
    cpu = torch.device("cpu")
    _, rows = SUITES["loader"](cpu, True, ["naive"], {"images": 6, "batch": 2, "workers": [0, 1], "model": None})
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert len(rows) == 1 and "pip install 'effdense[vision]'" in rows[0]["status"]
    else:
        assert [r["workers"] for r in rows] == [0, 1] and all(r["status"] == "ok" for r in rows)
        assert all(r["images"] == 6 and r["images_per_s"] > 0 for r in rows)
        assert rows[1]["images_per_s_per_worker"] == rows[1]["images_per_s"]
    _, rows = SUITES["loader"](cpu, True, ["naive"], {"workers": [], "size": 32, "model": "densenet121"})
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["images_per_s"] > 0


def _cpp_or_nothing() -> list[str]:
    from effdense import _ext
    return ["cpp"] if _ext.available() else []


def test_inference_suite_rows_fields_and_targets(tmp_path):
    """Issue 28: eval forward of naive, torch.compile of naive and the block backends at a tiny size; latency,
    images/s, peak memory and first call per row; the eval targets of batch 32 computed from the rows."""
    wanted = ["naive", "torch", *_cpp_or_nothing(), "compile"]
    assert cli.main(["--suite", "inference", "--device", "cpu", "--depths", "10", "--batches", "2", "32",
                     "--backends", *wanted, "--set", 'compile_backend="aot_eager"', "rounds=2", "reps=1",
                     "warmup=1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*/inference-*.json")
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert [(r["batch"], r["backend"]) for r in rows] == [(b, w) for b in (2, 32) for w in wanted]
    for r in rows:
        assert r["status"] == "ok" and r["depth"] == 10 and r["peak_bytes"] > 0 and r["first_call_s"] > 0, r
        assert r["latency_ms_min"] <= r["latency_ms"] <= r["latency_ms_max"] and len(r["latency_ms_rounds"]) == 2
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["latency_ms"] * 1e3)
    tg = report.targets(data)
    by = {(t["backend"], t["target"].split(": ")[1]): t for t in tg}
    efficient = [b for b in wanted if b in report.EFFICIENT]
    assert len(tg) == 2 * len(efficient), "batch 32 only, two targets per memory-efficient backend"
    naive = next(r for r in rows if r["backend"] == "naive" and r["batch"] == 32)
    for b in efficient:
        mine = next(r for r in rows if r["backend"] == b and r["batch"] == 32)
        assert by[(b, "peak memory <= naive")]["value"] == pytest.approx(mine["peak_bytes"] / naive["peak_bytes"])
        assert by[(b, "latency <= naive")]["value"] == pytest.approx(mine["latency_ms"] / naive["latency_ms"])
    assert all(t["met"] == (t["value"] <= 1.0) for t in tg)
    text = report.suite_markdown(data)
    assert "latency ms" in text and "first call s" in text and "eval BC-10 k=12 batch 32" in text
    assert ("What the missed targets would take" in text) == (not all(t["met"] for t in tg))


@pytest.mark.parametrize("suite", ["speed", "memory"])
def test_compile_rows_at_activation_memory_budgets(tmp_path, suite):
    """Issue 28: the compile rows once per budget, each compiled under its own budget (a lower budget saves less,
    so the step's peak falls: Dynamo must not hand the second model the first one's graphs), beside naive and
    cpp in one run; the report puts them in a table of their own with cpp against each budget."""
    wanted = ["naive", *_cpp_or_nothing(), "compile"]
    size = ["--depths", "16", "--growth-rates", "12"] + (["--batch", "2"] if suite == "memory" else
                                                         ["--batches", "2", "--dtypes", "fp32"])
    extra = ["rss=false", "rounds=2", "reps=1", "warmup=1"] if suite == "speed" else []
    assert cli.main(["--suite", suite, "--device", "cpu", *size, "--backends", *wanted, "--set", "budgets=[1.0,0.05]",
                     'compile_backend="aot_eager_decomp_partition"', *extra, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob(f"*/{suite}-*.json")
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert [(r["backend"], r.get("budget")) for r in rows] == [(b, None) for b in wanted[:-1]] + \
        [("compile", 1.0), ("compile", 0.05)]
    assert all(r["status"] == "ok" and r["peak_bytes"] > 0 for r in rows), rows
    full, low = rows[-2:]
    assert low["peak_bytes"] < full["peak_bytes"], "budget 0.05 recomputes: its step must need less memory"
    if suite == "speed":
        assert all(r["first_step_s"] > 0 and r["step_ms"] > 0 for r in rows)
    assert report.view(data) == f"{suite} budgets" and f"### {suite} budgets" in report.suite_markdown(data)
    tg = [t for t in report.targets(data) if "vs compile at budget" in t["target"]]
    if "cpp" in wanted:
        cpp = next(r for r in rows if r["backend"] == "cpp")
        mem = {t["target"].rsplit(" ", 1)[1]: t["value"] for t in tg if "peak memory" in t["target"]}
        assert mem == pytest.approx({"1": cpp["peak_bytes"] / full["peak_bytes"],
                                     "0.05": cpp["peak_bytes"] / low["peak_bytes"]})
        assert len(tg) == (4 if suite == "speed" else 2)


def test_budget_runs_sit_beside_the_suites_own_table(tmp_path):
    """A run of budgets below 1.0 does not replace the newest full speed table in the README section."""
    stored = json.loads(next(FIXTURE.glob("*/memory-*.json")).read_text())
    folder = tmp_path / "cpu-x"
    folder.mkdir()
    for name, budgets, stamp in (("plain", [1.0], "2026-01-01T00:00:00Z"), ("budgets", [1.0, 0.05],
                                                                            "2026-01-02T00:00:00Z")):
        env = dict(stored["env"], timestamp=stamp, command=f"run {name}", session=None)
        (folder / f"memory-{name}.json").write_text(json.dumps(dict(stored, quick=False, env=env,
                                                                    config=dict(stored["config"], budgets=budgets))))
    found = report.newest(str(tmp_path))["cpu-x"]
    assert set(found) == {"memory", "memory budgets"}
    assert found["memory"]["env"]["command"] == "run plain"
    text = report.section(str(tmp_path))
    assert text.index("cpu-x: memory\n") < text.index("cpu-x: memory budgets")


@pytest.mark.parametrize("bad", ["[2]", "[]", '["x"]'])
def test_budgets_outside_zero_one_are_refused(bad, tmp_path):
    with pytest.raises(ValueError, match=r"budgets: expected a list of activation memory budgets in \[0, 1\]"):
        cli.main(["--suite", "memory", "--device", "cpu", "--backends", "naive", "--set", f"budgets={bad}",
                  "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"activation memory budget must be in \[0, 1\], got 2"):
        from benchmarks.common import compile_model
        compile_model(torch.nn.Linear(1, 1), budget=2)
