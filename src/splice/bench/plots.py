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
    """Grouped bars: test accuracy of every arm (and baseline) on every task."""
    from splice.bench.report import arm_accuracies

    tasks = r["tasks"]
    rows = [(f"{k} baseline", [r["baselines"][k][t] for t in tasks]) for k in r["baselines"]]
    rows += [(f"{row['label']} ({row['impl']})" if row["impl"] != "-" else row["label"], arm_accuracies(row, tasks))
             for row in r["adapt"].values()]
    rows = [(n, v) for n, v in rows if any(a is not None for a in v)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(tasks)), 5))
    width = 0.8 / len(rows)
    for i, (name, accs) in enumerate(rows):
        xs = [j + i * width for j, a in enumerate(accs) if a is not None]
        ax.bar(xs, [100 * a for a in accs if a is not None], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Accuracy per method and task ({r['profile']} profile)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
            bars.append((f"base encoder + task heads [{kind}]", 100 * sum(p / o for p, o in zip(probe, own)) / len(own)))
        for method, cells in methods.items():
            for impl, c in cells.items():
                if c and "error" not in c:
                    bars.append((f"{method} [{kind}, {impl}]", 100 * c["normalized"]))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(8, max(3, 0.28 * len(bars))))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color=["grey" if "base encoder" in b[0] else "C0" if "splice" in b[0] else "C1" for b in bars])
    ax.axvline(100, color="grey", lw=0.8, ls="--")
    values = [b[1] for b in bars]
    ax.set_xlim(min(min(values), 100) - 3, max(max(values), 100) + 2)  # from 0 the differences would not show
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("mean normalized accuracy (% of the individual fine-tunes)")
    ax.set_title(f"Merges ({r['profile']} profile)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def vs_params(plt: Any, r: dict[str, Any], path: Path) -> Path | None:
    """Mean test accuracy against trainable parameters (log scale), one point per arm with every task done."""
    from splice.bench.report import _mean, arm_accuracies

    points = []
    for row in r["adapt"].values():
        mean = _mean(arm_accuracies(row, r["tasks"]))
        params = max((c["trainable"] for c in row["cells"].values() if c), default=None)
        if mean is not None and params:
            points.append((row["label"] + ("" if row["impl"] == "-" else f" ({row['impl']})"), params, 100 * mean))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, params, acc) in enumerate(points):
        ax.scatter(params, acc)
        # staggered labels: arms with the same parameter count and accuracy would print on top of each other
        ax.annotate(name, (params, acc), fontsize=7, xytext=(4, 2 - 9 * (i % 3)), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(f"Accuracy vs trainable parameters ({r['profile']} profile)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
