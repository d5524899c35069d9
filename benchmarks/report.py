"""Results JSON -> Markdown tables, PNG plots, and the README's "Measured" section.

``python -m benchmarks.report [--results DIR] [--readme README.md] [--plots] [--include-quick]`` reads the
newest result of each suite per device folder under ``DIR`` (default ``benchmarks/results``), writes
``<device>/summary.md`` beside them (and ``memory_vs_depth.png`` with ``--plots``, when matplotlib is
importable), prints the section, and with ``--readme`` replaces the text between ``<!-- measured:start -->``
and ``<!-- measured:end -->`` in that file, training runs recorded by :mod:`benchmarks.runs` included.

Results of ``python -m benchmarks --quick`` (small CI sizes, ``"quick": true`` in the JSON) are left out unless
``--include-quick`` is given, and never reach a README or a ``summary.md`` of a device folder that holds full
results: a quick run cannot overwrite measured figures. Nothing here is typed by hand.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re

UNITS = {"peak_bytes": "bytes", "rss_step_bytes": "bytes", "rss_step_bytes_fixed_mmap": "bytes",
         "rss_peak_bytes": "bytes", "rss_peak_bytes_fixed_mmap": "bytes", "floor_bytes": "bytes",
         "forward_ms": "ms", "backward_ms": "ms", "step_ms": "ms",
         "images_per_s": "images/s", "gbps": "GB/s (1e9 bytes)", "tflops": "TFLOP/s", "floor_ms": "ms",
         "step_flops": "FLOP", "step_bytes": "bytes", "deepest_depth": "layers", "cap_gib": "GiB",
         "first_step_s": "s", "achieved_gbps": "GB/s (1e9 bytes): the floor's bytes over the step time",
         "launches": "kernel launches per training step", "latency_ms": "ms per batch (eval forward)",
         "first_call_s": "s", "budget": "torch._functorch.config.activation_memory_budget",
         "images_per_s_per_worker": "images/s per DataLoader worker (the main process when 0 workers)"}
START, END = "<!-- measured:start -->", "<!-- measured:end -->"

#: per suite: (column title, row key, format); MiB columns convert from bytes
COLUMNS = {
    "memory": [("model", "model", "{}"), ("k", "growth_rate", "{}"), ("depth", "depth", "{}"),
               ("backend", "backend", "{}"), ("budget", "budget", "{}"), ("batch", "batch", "{}"),
               ("peak MiB", "peak_bytes", "mib"),
               ("floor MiB", "floor_bytes", "mib"), ("status", "status", "{}")],
    "speed": [("model", "model", "{}"), ("depth", "depth", "{}"), ("batch", "batch", "{}"), ("dtype", "dtype", "{}"),
              ("layout", "layout", "{}"), ("backend", "backend", "{}"), ("variant", "variant", "{}"),
              ("budget", "budget", "{}"),
              ("fwd ms", "forward_ms", "{:.2f}"),
              ("bwd ms", "backward_ms", "{:.2f}"), ("step ms", "step_ms", "{:.2f}"),
              ("step min-max", "step_ms", "spread"), ("rounds", "step_ms_rounds", "len"),
              ("img/s", "images_per_s", "{:.1f}"), ("peak MiB", "peak_bytes", "mib"),
              ("RSS rise MiB", "rss_step_bytes", "mib"),
              ("RSS rise, fixed mmap", "rss_step_bytes_fixed_mmap", "mib"), ("first step s", "first_step_s", "{:.1f}"),
              ("status", "status", "{}")],
    "capacity": [("cap GiB", "cap_gib", "{}"), ("backend", "backend", "{}"), ("model", "model", "{}"),
                 ("deepest depth", "deepest_depth", "{}"), ("trains", "trains", "{}"), ("status", "status", "{}")],
    "kernels": [("kind", "kind", "{}"), ("name", "name", "{}"), ("model", "model", "{}"), ("depth", "depth", "{}"),
                ("impl", "impl", "{}"), ("backend", "backend", "{}"),
                ("c_in", "c_in", "{}"), ("c_out", "c_out", "{}"), ("batch", "batch", "{}"), ("hw", "hw", "{}"),
                ("ms", "ms", "{:.3f}"), ("GB/s", "gbps", "{:.1f}"),
                ("TFLOP/s", "tflops", "{:.2f}"), ("step ms", "step_ms", "{:.2f}"), ("floor ms", "floor_ms", "{:.2f}"),
                ("x floor", "over_floor", "{:.1f}"), ("floor GB/s", "achieved_gbps", "{:.1f}"),
                ("of copy", "copy_fraction", "{:.1%}"), ("calls", "calls", "{}"), ("share", "share", "{:.1%}"),
                ("status", "status", "{}")],
    "peers": [("implementation", "impl", "{}"), ("same weights", "same_weights", "{}"),
              ("peak MiB", "peak_bytes", "mib"), ("step ms", "step_ms", "{:.2f}"), ("status", "status", "{}")],
    "launches": [("model", "model", "{}"), ("k", "growth_rate", "{}"), ("depth", "depth", "{}"),
                 ("backend", "backend", "{}"), ("launches", "launches", "{}"), ("ATen", "aten", "{}"),
                 ("Triton", "triton", "{}"), ("vs naive", "vs_naive", "{:.2f}x"),
                 ("syncs, dropout on", "host_syncs", "{}"), ("in blocks", "block_syncs", "{}"),
                 ("most launched", "top_ops", "top"), ("status", "status", "{}")],
    "loader": [("what", "kind", "{}"), ("workers", "workers", "{}"), ("model", "model", "{}"),
               ("backend", "backend", "{}"), ("batch", "batch", "{}"), ("size", "size", "{}"),
               ("img/s", "images_per_s", "{:.1f}"), ("img/s per worker", "images_per_s_per_worker", "{:.1f}"),
               ("step ms", "step_ms", "{:.0f}"), ("status", "status", "{}")],
    "inference": [("model", "model", "{}"), ("depth", "depth", "{}"), ("k", "growth_rate", "{}"),
                  ("batch", "batch", "{}"), ("dtype", "dtype", "{}"), ("backend", "backend", "{}"),
                  ("latency ms", "latency_ms", "{:.2f}"), ("min-max", "latency_ms", "spread"),
                  ("img/s", "images_per_s", "{:.1f}"), ("peak MiB", "peak_bytes", "mib"),
                  ("first call s", "first_call_s", "{:.1f}"), ("status", "status", "{}")],
}
#: the block backends that save memory, judged against naive in eval (issue 28)
EFFICIENT = ("checkpoint", "torch", "cpp", "triton")
#: how many operators the ``most launched`` column names
TOP_OPS = 4


def _cell(row: dict, key: str, fmt: str) -> str:
    if row.get(key) is None:
        return ""
    value = row[key]
    if fmt == "spread":
        return f"{row[key + '_min']:.2f}-{row[key + '_max']:.2f}" if key + "_min" in row else ""
    if fmt == "len":
        return str(len(value))
    if fmt == "top":
        return ", ".join(f"{name.removeprefix('aten::')} {n}" for name, n in value[:TOP_OPS])
    return f"{value / 2 ** 20:.1f}" if fmt == "mib" else fmt.format(value)


def table(columns: list[tuple[str, str, str]], rows: list[dict]) -> str:
    used = [c for c in columns if any(r.get(c[1]) is not None for r in rows)]
    lines = ["| " + " | ".join(c[0] for c in used) + " |", "|" + "---|" * len(used)]
    lines += ["| " + " | ".join(_cell(r, key, fmt) for _, key, fmt in used) + " |" for r in rows]
    return "\n".join(lines)


def provenance(data: dict) -> str:
    from .common import device_name
    e = data["env"]
    versions = f"torch {e['torch']}" + (f", triton {e['triton']}" if e.get("triton") else "") + \
        (f", CUDA {e['cuda']}" if e.get("cuda") else "") + (f", driver {e['driver']}" if e.get("driver") else "")
    commit = (e.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if e.get("dirty") else "")
    prec = e.get("precision") or {}
    tf32 = f"tf32 cudnn={e.get('tf32_cudnn')} matmul={e['tf32_matmul']}" + \
        (f", Triton fp32 dot {prec['fp32_dot']}" if prec.get("fp32_dot") else "")
    load = "" if e.get("loadavg") is None else \
        f"; {e.get('threads')} threads, load {'/'.join(f'{v:.1f}' for v in e['loadavg'])}" + \
        (f" (after: {'/'.join(f'{v:.1f}' for v in e['loadavg_end'])})" if e.get("loadavg_end") else "")
    cpu = f"; C++ CPU code {e['cpp_cpu']}" if e.get("cpp_cpu") and e.get("device_type") == "cpu" else ""
    text = (f"{device_name(e)} ({e['device_type']}), {versions}; {tf32}{load}{cpu}; commit {commit}; "
            f"{e['timestamp']}; `{e['command']}`")
    if data.get("runs"):
        text += f"; with {len(data['runs']) - 1} earlier run(s) of session {e.get('session')}: " + "; ".join(
            f"`{r['command']}`{'' if r['complete'] else ' (stopped before the end)'}" for r in data["runs"][:-1])
    return text


def _cpu_targets(label: str, sel: dict) -> list[dict]:
    """Issue 15's targets for the ``cpp`` backend on a CPU: step time <= 0.6x naive and below torch.compile of
    naive, peak memory <= 0.16x naive, and the resident memory a step adds <= 1.5x its allocator peak."""
    cpp, naive = sel["cpp"], sel["naive"]
    out = [dict(target=f"{label}: cpp step time <= 0.6x naive", backend="cpp",
                value=cpp["step_ms"] / naive["step_ms"], limit=0.6),
           dict(target=f"{label}: cpp peak memory <= 0.16x naive", backend="cpp",
                value=cpp["peak_bytes"] / naive["peak_bytes"], limit=0.16)]
    for suffix, how in (("", "glibc defaults"), ("_fixed_mmap", "fixed mmap threshold")):
        if cpp.get(f"rss_step_bytes{suffix}") and cpp.get(f"rss_peak_bytes{suffix}"):
            out.append(dict(target=f"{label}: cpp resident-memory rise <= 1.5x its allocator peak ({how})",
                            backend="cpp", value=cpp[f"rss_step_bytes{suffix}"] / cpp[f"rss_peak_bytes{suffix}"],
                            limit=1.5))
    if "compile" in sel:
        out.append(dict(target=f"{label}: cpp time below torch.compile of naive (ratio < 1)", backend="cpp",
                        value=cpp["step_ms"] / sel["compile"]["step_ms"], limit=1.0))
    return out


def targets(data: dict) -> list[dict]:
    """The issue's targets that this result can judge, each with the measured value and the gap."""
    out = []
    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    if data["suite"] == "speed":
        keys = sorted({(r["batch"], r["dtype"], r.get("layout", "nchw")) for r in rows})
        for batch, dtype, layout in keys:
                sel = {r["backend"]: r for r in rows if r["model"] == "bc" and r["depth"] == 100
                       and r.get("growth_rate") == 12 and r["batch"] == batch and r["dtype"] == dtype
                       and r.get("layout", "nchw") == layout and r.get("variant", "eager") in ("eager", "compile")
                       and r.get("budget", 1.0) == 1.0}
                eff = [r for b, r in sel.items() if b in ("torch", "cpp", "triton")]
                if "naive" not in sel or not eff:
                    continue
                naive = sel["naive"]
                best_mem = min(eff, key=lambda r: r["peak_bytes"])
                best_time = min(eff, key=lambda r: r["step_ms"])
                label = f"BC-100 k=12 batch {batch} {dtype}" + ("" if layout == "nchw" else f" {layout}")
                if data["env"].get("device_type") == "cpu" and "cpp" in sel:
                    out += _cpu_targets(label, sel)
                    continue
                out.append(dict(target=f"{label}: peak memory <= 0.2x naive", backend=best_mem["backend"],
                                value=best_mem["peak_bytes"] / naive["peak_bytes"], limit=0.2))
                out.append(dict(target=f"{label}: step time <= 0.9x naive", backend=best_time["backend"],
                                value=best_time["step_ms"] / naive["step_ms"], limit=0.9))
                if "compile" in sel:
                    out.append(dict(target=f"{label}: time below torch.compile of naive (ratio < 1)",
                                    backend=best_time["backend"],
                                    value=best_time["step_ms"] / sel["compile"]["step_ms"], limit=1.0))
                if "checkpoint" in sel:
                    ck = sel["checkpoint"]
                    out.append(dict(target=f"{label}: memory below checkpoint (ratio < 1)",
                                    backend=best_mem["backend"], value=best_mem["peak_bytes"] / ck["peak_bytes"],
                                    limit=1.0))
                    out.append(dict(target=f"{label}: time below checkpoint (ratio < 1)",
                                    backend=best_time["backend"], value=best_time["step_ms"] / ck["step_ms"],
                                    limit=1.0))
    if data["suite"] == "capacity":
        deep = [r for r in rows if r.get("cap_gib") == 12 and "deepest_depth" in r]
        if deep:
            best = max(deep, key=lambda r: r["deepest_depth"])
            out.append(dict(target="deepest DenseNet-BC k=12 in 12 GiB >= 1000 layers", backend=best["backend"],
                            value=best["deepest_depth"], limit=1000, higher_is_better=True))
        d264 = [r for r in rows if r.get("model") == "densenet264"]
        if d264:
            ok = [r for r in d264 if r["trains"]]
            out.append(dict(target="DenseNet-264 bf16 batch 64 trains in 4 GiB",
                            backend=(ok or d264)[0]["backend"], value=float(bool(ok)), limit=1.0,
                            higher_is_better=True))
    if data["suite"] == "launches":
        out += _launch_targets(rows)
    if data["suite"] == "inference":
        out += _inference_targets(rows)
    if view(data) in ("speed budgets", "memory budgets"):
        out += _budget_targets(rows)
    for t in out:
        better = t.get("higher_is_better", False)
        t["met"] = t["value"] >= t["limit"] if better else t["value"] <= t["limit"]
    return out


def _inference_targets(rows: list[dict]) -> list[dict]:
    """Issue 28: in eval, each memory-efficient backend needs no more peak memory than naive and is no slower
    at batch 32 and 256. A missed target carries a ``note``: what it would take, from the measured figures."""
    out = []
    for r in rows:
        naive = next((n for n in rows if n["backend"] == "naive" and all(n.get(f) == r.get(f) for f in
                                                                          ("model", "depth", "growth_rate", "batch",
                                                                           "dtype"))), None)
        if r["backend"] not in EFFICIENT or r["batch"] not in (32, 256) or naive is None:
            continue
        label = f"eval BC-{r['depth']} k={r['growth_rate']} batch {r['batch']}" if r["model"] == "bc" else \
            f"eval {r['model']} batch {r['batch']}"
        mib = (r["peak_bytes"] - naive["peak_bytes"]) / 2 ** 20
        out.append(dict(target=f"{label}: peak memory <= naive", backend=r["backend"],
                        value=r["peak_bytes"] / naive["peak_bytes"], limit=1.0,
                        note=f"{mib:.1f} MiB less at its peak: a forward that keeps no more than naive's live "
                             f"tensors (no workspace reserved for a backward that eval never runs)"))
        out.append(dict(target=f"{label}: latency <= naive", backend=r["backend"],
                        value=r["latency_ms"] / naive["latency_ms"], limit=1.0,
                        note=f"{r['latency_ms'] - naive['latency_ms']:.2f} ms less per batch "
                             f"({1 - naive['latency_ms'] / r['latency_ms']:.0%} of its forward)"))
    return out


def _budget_targets(rows: list[dict]) -> list[dict]:
    """Issue 28: where ``cpp`` stands against torch.compile at each activation memory budget (same model, batch,
    dtype and layout): peak memory, and in the speed suite step time, as ratios (below 1: cpp needs less)."""
    out = []
    keys = ("model", "depth", "growth_rate", "batch", "dtype", "layout")
    for c in rows:
        cpp = next((r for r in rows if r["backend"] == "cpp" and r.get("variant", "eager") == "eager"
                    and all(r.get(f) == c.get(f) for f in keys)), None)
        if c["backend"] != "compile" or c.get("variant", "compile") != "compile" or cpp is None:
            continue
        label = f"BC-{c['depth']} k={c['growth_rate']} batch {c['batch']}" if c["model"] == "bc" else \
            f"{c['model']} batch {c['batch']}"
        budget = c.get("budget", 1.0)
        out.append(dict(target=f"{label}: cpp peak memory vs compile at budget {budget:g}", backend="cpp",
                        value=cpp["peak_bytes"] / c["peak_bytes"], limit=1.0))
        if "step_ms" in c:
            out.append(dict(target=f"{label}: cpp step time vs compile at budget {budget:g}", backend="cpp",
                            value=cpp["step_ms"] / c["step_ms"], limit=1.0))
    return out


def _launch_targets(rows: list[dict]) -> list[dict]:
    """Issue 11: each kernel backend launches no more kernels than naive, and syncs the host nowhere in a block."""
    out = []
    for r in rows:
        if r["backend"] not in ("cpp", "triton"):
            continue
        label = f"BC-{r['depth']} k={r['growth_rate']}"
        if r.get("vs_naive") is not None:
            out.append(dict(target=f"{label}: launches <= naive", backend=r["backend"], value=r["vs_naive"],
                            limit=1.0))
        out.append(dict(target=f"{label}: host syncs in the dense blocks", backend=r["backend"],
                        value=r["block_syncs"], limit=0))
    return out


def view(data: dict) -> str:
    """The table a result belongs to: its suite, or ``<suite> budgets`` for a run of activation memory budgets
    below 1.0 (so that it sits beside the suite's own table instead of replacing it)."""
    budgets = (data.get("config") or {}).get("budgets") or [1.0]
    return data["suite"] + (" budgets" if any(b != 1.0 for b in budgets) else "")


def _view_order(name: str) -> tuple[int, str]:
    return list(COLUMNS).index(name.split()[0]), name


def suite_markdown(data: dict) -> str:
    cut = " (incomplete: stopped before the end)" if data.get("complete") is False else ""
    parts = [f"### {view(data)}{' (quick)' if data.get('quick') else ''}{cut}", "", provenance(data), "",
             table(COLUMNS[data["suite"]], data["rows"])]
    tg = targets(data)
    if tg:
        parts += ["", "| target | backend | measured | limit | met |", "|---|---|---|---|---|"]
        parts += [f"| {t['target']} | {t['backend']} | {t['value']:.3g} | {t['limit']:g} | "
                  f"{'yes' if t['met'] else 'no (gap ' + format(abs(t['value'] - t['limit']), '.3g') + ')'} |"
                  for t in tg]
        notes = [f"- {t['target']} ({t['backend']}): missed; it would take {t['note']}." for t in tg
                 if not t["met"] and t.get("note")]
        parts += ["", "What the missed targets would take:", "", *notes] if notes else []
    return "\n".join(parts)


def newest(results: str, include_quick: bool = False) -> dict[str, dict[str, dict]]:
    """``{device_folder: {suite: newest result}}``, quick runs' results only with ``include_quick``. Results of one
    session (``env.session``: the runs of one ``benchmarks/gpu_run.sh``) count as one: the newest session's files
    of a suite are merged, their rows in time order, their runs listed in ``runs``. A file without rows (a run
    stopped before its first) is left out."""
    found: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(glob.glob(os.path.join(results, "*", "*.json"))):
        with open(path) as f:
            data = json.load(f)
        if "suite" not in data or not data.get("rows") or (data.get("quick") and not include_quick):
            continue
        dev = os.path.basename(os.path.dirname(path))
        found.setdefault(dev, {}).setdefault(view(data), []).append(data)
    out: dict[str, dict[str, dict]] = {}
    for dev, suites in found.items():
        for suite, datas in suites.items():
            datas.sort(key=lambda d: d["env"]["timestamp"])
            last = datas[-1]
            session = last["env"].get("session")
            members = [d for d in datas if session and d["env"].get("session") == session] or [last]
            merged = dict(last, rows=[r for d in members for r in d["rows"]])
            if len(members) > 1:
                merged["runs"] = [dict(command=d["env"]["command"], timestamp=d["env"]["timestamp"],
                                       complete=d.get("complete", True)) for d in members]
            out.setdefault(dev, {})[suite] = merged
    return out


def section(results: str, link_from: str | None = None, include_quick: bool = False) -> str:
    """The README section; plots are linked relative to the folder ``link_from`` (the README's)."""
    from . import runs
    found = newest(results, include_quick)
    trained = runs.markdown(results, link_from)
    if not found and not trained:
        return "No benchmark results yet: run `python -m benchmarks` and then " \
               "`python -m benchmarks.report --readme README.md`."
    parts = ["Generated by `python -m benchmarks.report --readme README.md` from the newest files in "
             "`benchmarks/results/`."]
    for dev in sorted(found, key=lambda d: (not d.startswith("cuda"), d)):
        for suite in sorted(found[dev], key=_view_order):
            parts += ["", suite_markdown(found[dev][suite]).replace("### ", "#### " + dev + ": ", 1)]
            png = os.path.join(results, dev, "memory_vs_depth.png")
            if suite == "memory" and link_from is not None and os.path.exists(png):
                parts += ["", f"![peak memory vs depth, {dev}]({os.path.relpath(png, link_from)})"]
    if trained:
        parts += ["", trained]
    return "\n".join(parts)


def update_readme(readme: str, text: str) -> None:
    with open(readme) as f:
        content = f.read()
    if START not in content or END not in content:
        raise ValueError(f"{readme} has no {START} ... {END} markers")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", content,
                 flags=re.S)
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, readme)


def plot_memory(data: dict, path: str) -> bool:
    """Peak memory vs depth per backend, with the predicted floor dashed. False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    for k in sorted({r["growth_rate"] for r in rows}):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            sel = sorted((r for r in rows if r["backend"] == backend and r["growth_rate"] == k),
                         key=lambda r: r["depth"])
            if sel:
                ax.plot([r["depth"] for r in sel], [r["peak_bytes"] / 2 ** 20 for r in sel], "o-",
                        label=f"{backend} k={k}")
        floor = sorted({(r["depth"], r["floor_bytes"]) for r in rows if r["growth_rate"] == k})
        ax.plot([d for d, _ in floor], [b / 2 ** 20 for _, b in floor], "k--", label=f"predicted floor k={k}")
    ax.set_xlabel("depth (DenseNet-BC)")
    ax.set_ylabel("peak memory of one training step (MiB)")
    ax.set_title(f"{data['env']['device']}, batch {data['config']['batch']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _has_full_results(folder: str) -> bool:
    for path in glob.glob(os.path.join(folder, "*.json")):
        with open(path) as f:
            data = json.load(f)
        if "suite" in data and not data.get("quick"):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    from .common import RESULTS
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=RESULTS, metavar="DIR",
                   help="folder of <device>/<suite>-<time>.json results (default %(default)s)")
    p.add_argument("--readme", default=None, metavar="FILE",
                   help="also replace the measured section (between the markers) of this Markdown file")
    p.add_argument("--plots", action="store_true", help="also write <device>/memory_vs_depth.png (matplotlib)")
    p.add_argument("--include-quick", action="store_true",
                   help="also use --quick runs' results (printed, and summary.md in folders of quick results "
                        "only); not allowed with --readme")
    args = p.parse_args(argv)
    if args.include_quick and args.readme:
        p.error("--include-quick cannot be combined with --readme: quick results never reach the README")
    for dev, suites in newest(args.results, args.include_quick).items():
        folder = os.path.join(args.results, dev)
        if any(d.get("quick") for d in suites.values()) and _has_full_results(folder):
            print(f"{folder}: holds full results; its summary.md is not replaced by quick ones")
            continue
        with open(os.path.join(folder, "summary.md"), "w") as f:
            f.write("\n\n".join(suite_markdown(suites[s]) for s in sorted(suites, key=_view_order)) + "\n")
        if args.plots and "memory" in suites:
            plot_memory(suites["memory"], os.path.join(folder, "memory_vs_depth.png"))
    if args.readme:
        update_readme(args.readme, section(args.results, os.path.dirname(os.path.abspath(args.readme))))
    print(section(args.results, include_quick=args.include_quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
