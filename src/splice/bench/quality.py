"""The real-data quality benchmark: adapters and merges on all-MiniLM-L6-v2 and eight real tasks.

`run(profile)` fills a cell cache (see `Store`) in priority order and writes the markdown report and plots from
whatever has finished, so a long profile can run in chunks (`max_minutes`) and each chunk resumes where the last
stopped. Order (see `run_all`): baselines and task heads (the probe), the two merge inputs (splice LoRA q,v and full
fine-tuning) on every task, the merge table, every other arm on the first task, then the rest of the adapter table.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splice.bench.arms import FULL, PROBE, Arm, arms
from splice.bench.sources import default_cache
from splice.bench.store import Store
from splice.bench.tasks import TASK_NAMES, Task, load_task
from splice.errors import SpliceError, closest

# The fine-tunes whose deltas are merged: "LoRA densified" and "full fine-tune".
MERGE_INPUTS = {"lora": "splice_lora_qv", "full": "full"}
# Merge methods first in the merge table (the task-vector classics); every other registered method follows.
MERGE_FIRST = ["task_arithmetic", "ties", "dare_ties", "linear", "breadcrumbs_ties"]


@dataclass(frozen=True)
class Profile:
    """Sizes and schedules of one benchmark profile."""

    name: str
    tasks: tuple[str, ...]
    max_train: int  # train examples per task, the validation set included
    max_test: int
    val: int  # validation examples carved out of train (merge settings are chosen on them)
    epochs: float
    batch_size: int
    max_length: int
    lambdas: tuple[float, ...]  # λ grid of the merge methods
    densities: tuple[float, ...]  # density grid of the sparsifying merge methods
    calibration_per_task: int  # validation texts per task fed to Fisher / RegMean
    merge_kinds: tuple[str, ...] = ("lora", "full")  # which fine-tunes' deltas are merged (keys of MERGE_INPUTS)
    lr_adapter: float = 1e-3
    lr_full: float = 3e-5
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:8]


PROFILES = {
    # Every arm and every merge method end to end in minutes: the merge code paths are the same for both delta
    # kinds, so smoke merges only the LoRA deltas, with one setting per method (no validation search). CI runs it
    # on a machine that may have only Python and pip, so its tasks are the ones whose data installs from PyPI
    # (the others need npm or apt-get); rt_subjectivity is one only smoke uses.
    "smoke": Profile("smoke", ("rt_sentiment", "bbc_news", "rt_subjectivity"), max_train=200, max_test=100,
                     val=40, epochs=1.0, batch_size=16, max_length=32, lambdas=(0.5,), densities=(0.5,),
                     calibration_per_task=8, merge_kinds=("lora",)),
    "full": Profile("full", tuple(TASK_NAMES), max_train=2000, max_test=1000, val=200, epochs=3.0, batch_size=32,
                    max_length=64, lambdas=(0.3, 0.6, 1.0), densities=(0.2, 0.5), calibration_per_task=16),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise SpliceError(f"unknown profile {name!r}{closest(name, PROFILES)}; known: {', '.join(PROFILES)}")
    return PROFILES[name]


class OutOfTime(Exception):
    """The chunk's time budget is spent; finished cells are cached and the report is written."""


@dataclass
class Context:
    profile: Profile
    store: Store
    root: Path
    tasks: list[Task]
    base: Any
    tokenizer: Any
    base_dir: Path
    progress: bool
    deadline: float | None
    log: Callable[[str], None]
    mergekit: bool = True
    done: int = 0
    shard: tuple[int, int] = (0, 1)  # (i, n): this invocation trains every n-th adapter cell, from the i-th
    adapter_cells: int = 0  # adapter cells seen so far, cached or not (the shard counter)

    def mine(self) -> bool:
        """Whether the next adapter cell belongs to this shard (counted whether it is cached or not, so every
        shard of one profile numbers the cells alike)."""
        i, n = self.shard
        self.adapter_cells += 1
        return (self.adapter_cells - 1) % n == i

    def head(self, task: str) -> Path:
        return self.store.root / "heads" / f"{task}.safetensors"  # beside the cells: every cell is scored with it

    def check_time(self) -> None:
        # Every invocation computes at least one cell, so even a tiny budget makes progress.
        if self.deadline is not None and self.done > 0 and time.monotonic() > self.deadline:
            raise OutOfTime

    def cell(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The cached result of `key`, or compute it now (if the budget allows) and cache it."""
        found = self.store.get(key)
        if found is not None:
            return found
        self.check_time()
        self.log(f"[{key}]")
        start = time.perf_counter()
        value = compute()
        value["cell_seconds"] = time.perf_counter() - start
        value["versions"] = versions()  # what computed it, for a profile resumed across sessions and commits
        self.done += 1
        return self.store.put(key, value)


def task_digest(task: Task) -> str:
    """A digest of a task's three splits (texts and labels), so finished cells are never mixed with other data."""
    h = hashlib.sha256()
    for split in (task.train, task.val, task.test):
        h.update(json.dumps([split.texts, split.labels]).encode())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("splice", "torch", "transformers", "peft", "mergekit"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def ordered_arms() -> list[Arm]:
    """Every arm; the probe first, then the merge inputs, then the rest in registry order."""
    every = arms()
    first = [PROBE, *MERGE_INPUTS.values()]
    return sorted(every, key=lambda a: first.index(a.key) if a.key in first else len(first))


def run_baselines(ctx: Context) -> None:
    """Majority and TF-IDF baselines and the frozen-encoder probe, whose head every other arm reuses."""
    from splice.bench import cells

    p = ctx.profile
    for task in ctx.tasks:
        ctx.cell(f"baseline/{task.name}/majority", lambda: {"accuracy": cells.majority(task)})
        ctx.cell(f"baseline/{task.name}/tfidf", lambda: {"accuracy": cells.tfidf(task)})
        if not ctx.head(task.name).is_file():  # the head file is part of the probe cell
            ctx.store.root.joinpath("cells", "adapt", task.name, "probe.json").unlink(missing_ok=True)
        ctx.cell(f"adapt/{task.name}/probe", lambda: cells.fit_head(ctx.base, ctx.tokenizer, task, p.max_length,
                                                                   ctx.head(task.name), ctx.progress))


def run_adapters(ctx: Context, todo: list[Arm], tasks: list[Task]) -> None:
    """Train each arm on each task (arm by arm), caching each (task, arm) cell."""
    from splice.bench import cells
    from splice.bench.merge_table import merges_pending
    from splice.train.loop import TrainConfig

    p = ctx.profile
    for arm in todo:
        lr = p.lr_full if arm.method == FULL else p.lr_adapter
        train = TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=lr, max_length=p.max_length, seed=p.seed,
                            strategy=arm.strategy or None)
        kind = next((k for k, v in MERGE_INPUTS.items() if v == arm.key and k in p.merge_kinds), None)
        for task in tasks:
            save = ctx.root / "finetunes" / kind / task.name if kind else None
            key = f"adapt/{task.name}/{arm.key}"
            # The merge table still needs this fine-tune's weights, which live only in the cache folder: re-train it.
            stale = save is not None and not (save / "config.json").is_file() and merges_pending(ctx, kind)
            if not ctx.mine() and (stale or ctx.store.get(key) is None):
                continue  # another shard's cell
            before = ctx.store.get(key) if stale else None
            if stale:
                ctx.store.drop(key)
            after = ctx.cell(key, lambda: cells.train_cell(
                arm, ctx.base, ctx.tokenizer, task, ctx.head(task.name), train, ctx.progress, save))
            if before is not None and after.get("weights_sha256") != before.get("weights_sha256"):
                # Not bit-identical (another CPU, say): the merges finished so far merged other weights.
                ctx.log(f"{key}: re-trained weights differ from the earlier run's; the {kind} merge table restarts")
                ctx.store.drop(f"merge/{kind}")
                ctx.store.drop(f"mergekit/{kind}")


def run_all(ctx: Context) -> None:
    """Every cell, in the order that makes a partial run most useful: the baselines, the merge inputs on every
    task, the merge table (while the fine-tunes it merges are on disk), every other arm on the first task (the
    quickstart task, so each method's row starts there), then the other arms on the remaining tasks."""
    from splice.bench.merge_table import run_merges

    run_baselines(ctx)
    trained = [a for a in ordered_arms() if a.method != PROBE]
    inputs = [a for a in trained if a.key in MERGE_INPUTS.values()]
    others = [a for a in trained if a.key not in MERGE_INPUTS.values()]
    run_adapters(ctx, inputs, ctx.tasks)
    run_merges(ctx)  # each shard its share, once every shard's fine-tunes exist
    run_adapters(ctx, others, ctx.tasks[:1])
    run_adapters(ctx, others, ctx.tasks[1:])


def run(profile: str | Profile = "smoke", *, cache: Path | None = None, work: Path | None = None,
        cells: Path | None = None, out: Path | None = None,
        max_minutes: float | None = None, progress: bool = True, mergekit: bool = True,
        command: str = "", report_only: bool = False, log: Callable[[str], None] = print,
        shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Run (or resume) one profile and write its report; returns the collected results.

    Args:
        profile: "smoke", "full" or a `Profile`.
        cache: the cache folder (data, fine-tunes, finished cells); default `default_cache()`.
        work: where this profile's fine-tunes and finished cells go (default: a folder of `cache` named after the
            profile and a digest of its settings); a fresh folder re-runs every cell on the cached data.
        cells: keep the finished cells, the invocation log and the task heads in a folder of `cells` named like
            the work folder instead of in the work folder: small files that can be committed, so a profile longer
            than one machine's life resumes on the next machine (the fine-tunes stay in the work folder and are
            re-trained there only while a merge still needs them; re-trained weights that are not bit-identical
            to the earlier run's restart that kind's merge table).
        out: where quality.md and the PNG plots go; default bench/results under the current folder.
        max_minutes: start no new cell after this many minutes (the report covers what finished).
        mergekit: also score mergekit's merge of the same deltas where mergekit has the method.
        command: the command line that reproduces this run, printed in the report.
        report_only: compute nothing; write the report from the cells finished so far.
        shard: (i, n): train only every n-th adapter cell starting at the i-th, so n processes (one per core) can
            fill one profile's cache side by side; the merge table is split between them the same way, each merge
            starting once every fine-tune it needs exists.

    Raises:
        SpliceError: a missing data source, model or package, as one line naming what to install.
    """
    import torch

    from splice.bench.report import collect, cpu_name, write_report
    from splice.io.models import load_model

    p = get_profile(profile) if isinstance(profile, str) else profile
    cache = (cache or default_cache()).expanduser()
    root = work or cache / "runs" / f"{p.name}-{p.digest()}"
    store = Store(cells / root.name if cells is not None else root)
    started, t0 = time.time(), time.monotonic()
    deadline = t0 + 60 * max_minutes if max_minutes is not None else None
    tasks = [load_task(n, cache, max_train=p.max_train, max_test=p.max_test, val=p.val, seed=p.seed)
             for n in p.tasks]
    store.check_data({t.name: task_digest(t) for t in tasks})
    base, tokenizer = load_model("default", "encoder")
    base_dir = root / "finetunes" / "base"
    if not (base_dir / "config.json").is_file():  # saved like the fine-tunes, so every input has the same tensors
        from splice.bench.cells import save_model

        save_model(base, base_dir, tokenizer)
    i, n = shard
    if not 0 <= i < n:
        raise SpliceError(f"shard: expected I/N with 0 <= I < N, got {i}/{n}")
    ctx = Context(p, store, root, tasks, base, tokenizer, base_dir, progress, deadline, log, mergekit, shard=shard)
    finished = True
    if report_only:
        runs = store.runs()
    else:
        try:
            run_all(ctx)
        except OutOfTime:
            finished = False
            log(f"time budget of {max_minutes} min spent; finished cells are cached, run again to continue")
        runs = store.log_run({"start": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
                              "seconds": round(time.monotonic() - t0, 1), "cells": ctx.done, "finished": finished,
                              "command": command, "shard": f"{i}/{n}", "threads": torch.get_num_threads(),
                              "cpu": cpu_name(), "host": platform.node()})
    results = collect(ctx, runs)
    out = out or Path("bench/results")
    report = write_report(results, out, p, command)
    log(f"report: {report}")
    return results
