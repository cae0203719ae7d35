"""The report's three PNG plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    from splice.bench.sources import require_module

    require_module("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(r: dict[str, Any], out: Path, stem: str) -> list[Path]:
    plt = _pyplot()
    paths = [per_task(plt, r, out / f"{stem}-accuracy.png"), merges(plt, r, out / f"{stem}-merges.png"),
             vs_params(plt, r, out / f"{stem}-params.png")]
    plt.close("all")
    return [p for p in paths if p is not None]


def per_task(plt: Any, r: dict[str, Any], path: Path) -> Path | None:
    """A heat map, one row per arm (and baseline), one column per task and the mean: each cell prints the test
    accuracy and is coloured by its difference from the frozen probe on that task (red below, blue above), so that
    dozens of methods stay readable side by side. Cells not run yet are blank."""
    import numpy as np

    from splice.bench.report import _mean, arm_accuracies

    tasks = r["tasks"]
    rows = [(f"{k} baseline", [r["baselines"][k][t] for t in tasks]) for k in r["baselines"]]
    rows += [(f"{row['label']} ({row['impl']})" if row["impl"] != "-" else row["label"], arm_accuracies(row, tasks))
             for row in r["adapt"].values()]
    rows = [(n, v + [_mean(v)]) for n, v in rows if any(a is not None for a in v)]
    probe = next((v for n, v in rows if n == "head-only probe"), None)
    if not rows or probe is None:
        return None
    acc = np.array([[np.nan if a is None else 100 * a for a in v] for _, v in rows])
    ref = np.array([np.nan if a is None else 100 * a for a in probe])
    diff = acc - ref[None, :]
    fig, ax = plt.subplots(figsize=(1.1 * (len(tasks) + 1) + 3, 0.26 * len(rows) + 1.6))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="white")
    limit = max(5.0, float(np.nanmax(np.abs(diff[2:]))) if np.isfinite(diff[2:]).any() else 5.0)
    image = ax.imshow(np.ma.masked_invalid(diff), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            if np.isfinite(acc[i, j]):
                ax.text(j, i, f"{acc[i, j]:.1f}", ha="center", va="center", fontsize=6.5,
                        color="white" if abs(diff[i, j]) > 0.6 * limit else "black")
    ax.set_xticks(range(len(tasks) + 1), [*tasks, "mean"], rotation=25, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_title(f"Test accuracy per method and task ({r['profile']} profile); colour: points above (blue) or below "
                 "(red) the frozen probe", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="accuracy − probe's (points)")
    fig.tight_layout()
    _save(fig, path)
    return path


def merges(plt: Any, r: dict[str, Any], path: Path) -> Path | None:
    """Horizontal bars: mean normalized test accuracy of each merge method, per delta kind and implementation, below
    a grey bar for the frozen probe (the base encoder with the task heads: what a merge has to beat)."""
    from splice.bench.quality import MERGE_INPUTS, PROBE
    from splice.bench.report import arm_accuracies

    bars = []
    for kind, methods in r["merges"].items():
        probe = arm_accuracies(r["adapt"][PROBE], r["tasks"])
        own = arm_accuracies(r["adapt"][MERGE_INPUTS[kind]], r["tasks"])
        if any(c["splice"] for c in methods.values()) and None not in probe + own:
            normalized = sum(p / o for p, o in zip(probe, own)) / len(own)
            bars.append((f"base encoder + task heads [{kind}]", 100 * normalized))
        for method, cells in methods.items():
            for impl, c in cells.items():
                if c and "error" not in c:
                    bars.append((f"{method} [{kind}, {impl}]", 100 * c["normalized"]))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(8, max(3, 0.28 * len(bars))))
    colours = ["grey" if "base encoder" in b[0] else "C0" if "splice" in b[0] else "C1" for b in bars]
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color=colours)
    ax.axvline(100, color="grey", lw=0.8, ls="--")
    values = [b[1] for b in bars]
    ax.set_xlim(min(min(values), 100) - 3, max(max(values), 100) + 2)  # from 0 the differences would not show
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("mean normalized accuracy (% of the individual fine-tunes)")
    ax.set_title(f"Merges ({r['profile']} profile)")
    fig.tight_layout()
    _save(fig, path)
    return path


def vs_params(plt: Any, r: dict[str, Any], path: Path) -> Path | None:
    """Test accuracy against trainable parameters (log scale): on the left the mean over the tasks, one point per arm
    with every task done; on the right the first task (the quickstart's), one point per arm trained there."""
    from splice.bench.report import _mean, arm_accuracies

    def label(row: dict[str, Any]) -> str:
        return row["label"] + ("" if row["impl"] == "-" else f" ({row['impl']})")

    def params(row: dict[str, Any]) -> int | None:
        return max((c["trainable"] for c in row["cells"].values() if c), default=None)

    first = r["tasks"][0]
    panels = [("mean over the tasks", [(label(row), params(row), _mean(arm_accuracies(row, r["tasks"])))
                                       for row in r["adapt"].values()]),
              (first, [(label(row), params(row), arm_accuracies(row, r["tasks"])[0]) for row in r["adapt"].values()])]
    panels = [(title, [(n, p, 100 * a) for n, p, a in pts if p and a is not None]) for title, pts in panels]
    if not panels[1][1]:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(15, 7))
    for ax, (title, points) in zip(axes, panels):
        for i, (name, count, acc) in enumerate(points):
            ax.scatter(count, acc, s=14)
            # staggered labels: arms with the same parameter count and accuracy would print on top of each other
            ax.annotate(name, (count, acc), fontsize=6, xytext=(3, 2 - 6 * (i % 3)), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"test accuracy (%), {title}")
        ax.set_title(f"{title}: {len(points)} arm(s)", fontsize=10)
    fig.suptitle(f"Accuracy vs trainable parameters ({r['profile']} profile)")
    fig.tight_layout()
    _save(fig, path)
    return path


def _save(fig: Any, path: Path) -> None:
    """Through a temporary file: shards write the report side by side, and a reader never sees half a PNG."""
    from splice.io.checkpoints import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
