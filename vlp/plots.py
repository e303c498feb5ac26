"""Plots of a run's metrics.csv (matplotlib, headless)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


def read_metrics(metrics_csv: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from Lightning's CSVLogger file, skipping empty cells."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series[key].append((step, float(value)))
    return dict(series)


def plot_losses(metrics_csv: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """One panel per training loss (``train/*`` except lr and the throughput rates), smoothed with a running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not Path(metrics_csv).exists():
        return None
    from vlp.utils.throughput import THROUGHPUT_KEYS

    series = {k: v for k, v in read_metrics(metrics_csv).items()
              if k.startswith("train/") and k != "train/lr" and k not in THROUGHPUT_KEYS}
    if not series:
        return None
    names = sorted(series, key=lambda k: (k != "train/loss", k))
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = zip(*series[name])
        ax.plot(steps, values, lw=0.6, alpha=0.4)
        w = max(1, len(values) // 20)
        smooth = [sum(values[max(0, i - w + 1): i + 1]) / len(values[max(0, i - w + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, lw=1.5)
        ax.set_title(name.removeprefix("train/"), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
