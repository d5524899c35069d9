"""What a run writes about itself: per-epoch CSV and JSON, ``curves.png``, TensorBoard, and the epoch table printed
at the end."""
from __future__ import annotations

import csv
import io
import json
import os

from .checkpoints import atomic_write, atomic_write_text

class Logger:
    """Per-epoch CSV, JSON, PNG curves and TensorBoard in the output folder (process 0 only)."""

    def __init__(self, out: str, config: dict, enabled: bool, title: str = "") -> None:
        self.out, self.config, self.enabled, self.title = out, config, enabled, title
        self.tb = None
        self.notes: list[str] = []
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out, "tb"))
        except ImportError:
            self.notes.append("TensorBoard logging off (pip install 'effdense[tensorboard]')")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.notes.append("no curves.png (pip install 'effdense[plots]')")

    def epoch(self, history: list[dict]) -> None:
        if not self.enabled:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(os.path.join(self.out, "log.csv"), buf.getvalue())
        atomic_write_text(os.path.join(self.out, "log.json"),
                                        json.dumps({"config": self.config, "epochs": history}, indent=1))
        if self.tb is not None:
            row = history[-1]
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["epoch"])
            self.tb.flush()
        plot_curves(history, os.path.join(self.out, "curves.png"), self.title)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def curve_series(history: list[dict]) -> dict[str, dict[str, list[float]]]:
    """What curves.png plots: per axis label, per split, one value per epoch; accuracy in percent, as printed.
    The second split is the test split when the run had no validation split."""
    monitor = history[-1].get("monitor", "val")
    return {ylabel: {split if split == "train" else monitor: [r[f"{split}_{metric}"] * scale for r in history]
                     for split in ("train", "val")}
            for ylabel, metric, scale in (("cross-entropy loss", "loss", 1.0), ("accuracy (%)", "acc", 100.0))}


def plot_curves(history: list[dict], path: str, title: str = "") -> None:
    """Loss and accuracy (in percent, as the console prints it) against epoch, when matplotlib is importable."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (ylabel, series) in zip(axes, curve_series(history).items()):
        for label, values in series.items():
            ax.plot(epochs, values, marker=".", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


COLUMNS = [("epoch", "{:>5}"), ("lr", "{:>9.2e}"), ("train_loss", "{:>10.4f}"), ("train_acc", "{:>9.2%}"),
           ("val_loss", "{:>8.4f}"), ("val_acc", "{:>8.2%}"), ("images_per_s", "{:>8.0f}"), ("seconds", "{:>7.1f}"),
           ("peak_mem_mib", "{:>8.0f}")]


def number(value: float, decimals: int = 4) -> str:
    """A loss for people: fixed point while that is short, else scientific (a diverging run's loss of 1e34 is
    not printed as 35 digits); nan and inf as such."""
    return f"{value:.{decimals}f}" if abs(value) < 1e4 else f"{value:.3e}"


def _cell(key: str, fmt: str, value) -> str:
    if value is None:
        return "-"
    if key.endswith("_loss"):
        return number(value)
    return fmt.format(value)


def epoch_table(history: list[dict]) -> str:
    heads = ["epoch", "lr", "train loss", "train acc", "val loss", "val acc", "img/s", "time s", "peak MiB"]
    widths = [len(fmt.format(1)) if key != "lr" else 9 for key, fmt in COLUMNS]
    lines = [" ".join(h.rjust(max(w, len(h))) for h, w in zip(heads, widths))]
    for row in history:
        cells = [_cell(key, fmt, row.get(key)).rjust(max(w, len(h)))
                 for (key, fmt), h, w in zip(COLUMNS, heads, widths)]
        lines.append(" ".join(cells))
    return "\n".join(lines)
