"""Results JSON -> Markdown tables, PNG plots, and the README's "Measured" section.

``python -m benchmarks.report [--results DIR] [--readme README.md] [--plots]`` reads the newest result of
each suite per device under ``DIR`` (default ``benchmarks/results``), writes ``<device>/summary.md`` (and
PNG plots with ``--plots`` when matplotlib is importable), and with ``--readme`` replaces the text between
``<!-- measured:start -->`` and ``<!-- measured:end -->`` in that file, training runs recorded by
:mod:`benchmarks.runs` included. Nothing here is typed by hand.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re

UNITS = {"peak_bytes": "bytes", "floor_bytes": "bytes", "forward_ms": "ms", "backward_ms": "ms", "step_ms": "ms",
         "images_per_s": "images/s", "gbps": "GB/s (1e9 bytes)", "tflops": "TFLOP/s", "floor_ms": "ms",
         "step_flops": "FLOP", "step_bytes": "bytes", "deepest_depth": "layers", "cap_gib": "GiB"}
START, END = "<!-- measured:start -->", "<!-- measured:end -->"

#: per suite: (column title, row key, format); MiB columns convert from bytes
COLUMNS = {
    "memory": [("model", "model", "{}"), ("k", "growth_rate", "{}"), ("depth", "depth", "{}"),
               ("backend", "backend", "{}"), ("batch", "batch", "{}"), ("peak MiB", "peak_bytes", "mib"),
               ("floor MiB", "floor_bytes", "mib"), ("status", "status", "{}")],
    "speed": [("model", "model", "{}"), ("depth", "depth", "{}"), ("batch", "batch", "{}"), ("dtype", "dtype", "{}"),
              ("backend", "backend", "{}"), ("fwd ms", "forward_ms", "{:.2f}"), ("bwd ms", "backward_ms", "{:.2f}"),
              ("step ms", "step_ms", "{:.2f}"), ("img/s", "images_per_s", "{:.1f}"), ("peak MiB", "peak_bytes", "mib"),
              ("status", "status", "{}")],
    "capacity": [("cap GiB", "cap_gib", "{}"), ("backend", "backend", "{}"), ("model", "model", "{}"),
                 ("deepest depth", "deepest_depth", "{}"), ("trains", "trains", "{}"), ("status", "status", "{}")],
    "kernels": [("kind", "kind", "{}"), ("name", "name", "{}"), ("model", "model", "{}"), ("depth", "depth", "{}"),
                ("impl", "impl", "{}"), ("backend", "backend", "{}"),
                ("c_in", "c_in", "{}"), ("c_out", "c_out", "{}"), ("ms", "ms", "{:.3f}"), ("GB/s", "gbps", "{:.1f}"),
                ("TFLOP/s", "tflops", "{:.2f}"), ("step ms", "step_ms", "{:.2f}"), ("floor ms", "floor_ms", "{:.2f}"),
                ("x floor", "over_floor", "{:.1f}"), ("status", "status", "{}")],
    "peers": [("implementation", "impl", "{}"), ("same weights", "same_weights", "{}"),
              ("peak MiB", "peak_bytes", "mib"), ("step ms", "step_ms", "{:.2f}"), ("status", "status", "{}")],
}


def _cell(row: dict, key: str, fmt: str) -> str:
    if row.get(key) is None:
        return ""
    value = row[key]
    return f"{value / 2 ** 20:.1f}" if fmt == "mib" else fmt.format(value)


def table(columns: list[tuple[str, str, str]], rows: list[dict]) -> str:
    used = [c for c in columns if any(r.get(c[1]) is not None for r in rows)]
    lines = ["| " + " | ".join(c[0] for c in used) + " |", "|" + "---|" * len(used)]
    lines += ["| " + " | ".join(_cell(r, key, fmt) for _, key, fmt in used) + " |" for r in rows]
    return "\n".join(lines)


def provenance(data: dict) -> str:
    e = data["env"]
    versions = f"torch {e['torch']}" + (f", triton {e['triton']}" if e.get("triton") else "") + \
        (f", CUDA {e['cuda']}" if e.get("cuda") else "") + (f", driver {e['driver']}" if e.get("driver") else "")
    commit = (e.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if e.get("dirty") else "")
    return (f"{e['device']} ({e['device_type']}), {versions}; tf32 matmul={e['tf32_matmul']}; commit {commit}; "
            f"{e['timestamp']}; `{e['command']}`")


def targets(data: dict) -> list[dict]:
    """The issue's targets that this result can judge, each with the measured value and the gap."""
    out = []
    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    if data["suite"] == "speed":
        for batch in sorted({r["batch"] for r in rows}):
            for dtype in sorted({r["dtype"] for r in rows}):
                sel = {r["backend"]: r for r in rows if r["model"] == "bc" and r["depth"] == 100
                       and r.get("growth_rate") == 12 and r["batch"] == batch and r["dtype"] == dtype}
                eff = [r for b, r in sel.items() if b in ("torch", "cpp", "triton")]
                if "naive" not in sel or not eff:
                    continue
                naive = sel["naive"]
                best_mem = min(eff, key=lambda r: r["peak_bytes"])
                best_time = min(eff, key=lambda r: r["step_ms"])
                label = f"BC-100 k=12 batch {batch} {dtype}"
                out.append(dict(target=f"{label}: peak memory <= 0.2x naive", backend=best_mem["backend"],
                                value=best_mem["peak_bytes"] / naive["peak_bytes"], limit=0.2))
                out.append(dict(target=f"{label}: step time <= 0.9x naive", backend=best_time["backend"],
                                value=best_time["step_ms"] / naive["step_ms"], limit=0.9))
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
    for t in out:
        better = t.get("higher_is_better", False)
        t["met"] = t["value"] >= t["limit"] if better else t["value"] <= t["limit"]
    return out


def suite_markdown(data: dict) -> str:
    parts = [f"### {data['suite']}{' (quick)' if data.get('quick') else ''}", "", provenance(data), "",
             table(COLUMNS[data["suite"]], data["rows"])]
    tg = targets(data)
    if tg:
        parts += ["", "| target | backend | measured | limit | met |", "|---|---|---|---|---|"]
        parts += [f"| {t['target']} | {t['backend']} | {t['value']:.3g} | {t['limit']:g} | "
                  f"{'yes' if t['met'] else 'no (gap ' + format(abs(t['value'] - t['limit']), '.3g') + ')'} |"
                  for t in tg]
    return "\n".join(parts)


def newest(results: str) -> dict[str, dict[str, dict]]:
    """``{device_folder: {suite: newest result}}``."""
    found: dict[str, dict[str, dict]] = {}
    for path in sorted(glob.glob(os.path.join(results, "*", "*.json"))):
        with open(path) as f:
            data = json.load(f)
        dev = os.path.basename(os.path.dirname(path))
        prev = found.setdefault(dev, {}).get(data["suite"])
        if prev is None or data["env"]["timestamp"] >= prev["env"]["timestamp"]:
            found[dev][data["suite"]] = data
    return found


def section(results: str, link_from: str | None = None) -> str:
    """The README section; plots are linked relative to the folder ``link_from`` (the README's)."""
    from . import runs
    found = newest(results)
    trained = runs.markdown(results, link_from)
    if not found and not trained:
        return "No benchmark results yet: run `python -m benchmarks` and then " \
               "`python -m benchmarks.report --readme README.md`."
    parts = ["Generated by `python -m benchmarks.report --readme README.md` from the newest files in "
             "`benchmarks/results/`."]
    order = list(COLUMNS)
    for dev in sorted(found, key=lambda d: (not d.startswith("cuda"), d)):
        for suite in sorted(found[dev], key=order.index):
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


def main(argv: list[str] | None = None) -> int:
    from .common import RESULTS
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--readme", default=None)
    p.add_argument("--plots", action="store_true")
    args = p.parse_args(argv)
    for dev, suites in newest(args.results).items():
        folder = os.path.join(args.results, dev)
        with open(os.path.join(folder, "summary.md"), "w") as f:
            f.write("\n\n".join(suite_markdown(suites[s]) for s in sorted(suites, key=list(COLUMNS).index)) + "\n")
        if args.plots and "memory" in suites:
            plot_memory(suites["memory"], os.path.join(folder, "memory_vs_depth.png"))
    if args.readme:
        update_readme(args.readme, section(args.results, os.path.dirname(os.path.abspath(args.readme))))
    print(section(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
