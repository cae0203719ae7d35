"""Cells of the merge table: for each kind of delta and each registered merge method, choose the setting on the
validation split (mean normalized accuracy: merged ÷ the task's own fine-tune), then score it on test; and where
mergekit has the method, score mergekit's merge of the same inputs with the same setting.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from splice.errors import SpliceError

# What a merge method raises for inputs it cannot merge (SLERP and 8 models, ...).
MERGE_ERRORS = (SpliceError, RuntimeError, ValueError, TypeError)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def normalized(acc: dict[str, float], individual: dict[str, float]) -> float:
    """Mean over tasks of merged ÷ individual fine-tune accuracy (the task-arithmetic literature's measure)."""
    return sum(acc[t] / individual[t] for t in acc) / len(acc)


def method_order() -> list[str]:
    from splice.bench.quality import MERGE_FIRST
    from splice.merge.methods.registry import merge_method_names

    names = merge_method_names()
    return [m for m in MERGE_FIRST if m in names] + [m for m in names if m not in MERGE_FIRST]


def merges_pending(ctx: Any, kind: str) -> bool:
    """Whether some merge-table cell of this kind of delta (splice's, or mergekit's where it has the method) is not
    finished yet, so the fine-tunes it merges are still needed."""
    from splice.bench.merging import mergekit_methods

    theirs = mergekit_methods() if ctx.mergekit else set()
    for method in method_order():
        chosen = ctx.store.get(f"merge/{kind}/{method}/test")
        if chosen is None:
            return True
        if "error" not in chosen and method in theirs and ctx.store.get(f"mergekit/{kind}/{method}") is None:
            return True
    return False


def run_merges(ctx: Any) -> None:
    """Every (delta kind, merge method) pair whose inputs all exist; shard i of n takes every n-th pair."""
    from splice.bench.quality import MERGE_INPUTS

    i, n = ctx.shard
    pairs = [(kind, method) for kind in ctx.profile.merge_kinds for method in method_order()]
    for kind in ctx.profile.merge_kinds:
        arm_key = MERGE_INPUTS[kind]
        folders = [ctx.root / "finetunes" / kind / t.name for t in ctx.tasks]
        cells = [ctx.store.get(f"adapt/{t.name}/{arm_key}") for t in ctx.tasks]
        if not all((f / "config.json").is_file() for f in folders) or None in cells:
            continue  # the adapter stage has not produced every input yet (out of time, or another shard's)
        individual = {split: {t.name: c[key] for t, c in zip(ctx.tasks, cells)}
                      for split, key in (("val", "val_accuracy"), ("test", "accuracy"))}
        for method in method_order():
            if pairs.index((kind, method)) % n == i:
                merge_cell(ctx, kind, method, folders, individual)


def task_statistics(ctx: Any, folders: list, kinds: set[str]) -> Any:
    """Each fine-tune's calibration statistics on its own task's validation texts, through that task's frozen
    head: the Fisher of Matena & Raffel (one unit per example, labels drawn from the model's own prediction, so no
    gold label is read) and RegMean's Grams (each model's own data, as Jin et al. compute them).

    `splice merge` takes a Fisher from a model's own loss and Grams from one shared text list; these fine-tunes are
    bare encoders whose heads live beside the cells, each with its own task, so the benchmark computes both here
    and hands the merge a ready `Calibration`.
    """
    from splice.bench.cells import classifier
    from splice.io.models import load_model
    from splice.merge.calibration import Calibration, compute_fisher, compute_gram, sampled_label_loss
    from splice.train.data import ClassificationCollator, batches

    collate = ClassificationCollator(ctx.tokenizer, ctx.profile.max_length)
    loss = sampled_label_loss(ctx.profile.seed)
    per_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in sorted(kinds)}
    for folder, task in zip(folders, ctx.tasks):
        encoder, _ = load_model(str(folder), "encoder")
        model = classifier(encoder, task, ctx.head(task.name))
        examples = list(task.val)[:ctx.profile.calibration_per_task]
        # Labels stay out: the Fisher draws its own and the Grams need none.
        chosen = [{k: v for k, v in collate(b).items() if k != "labels"} for b in batches(examples, 8)]
        stats = {"fisher": lambda: compute_fisher(model, chosen, loss, per_example=True),
                 "gram": lambda: compute_gram(model, chosen)}
        for k in per_kind:
            # The head is frozen and holds no merged tensor; the encoder's names lose the wrapper's prefix.
            per_kind[k].append({n.removeprefix("encoder."): t for n, t in stats[k]().items()
                                if n.startswith("encoder.")})
    return Calibration(data=per_kind, meta={"data": "each task's validation texts, through its frozen head"})


def merge_cell(ctx: Any, kind: str, name: str, folders: list, individual: dict[str, dict[str, float]]) -> None:
    """Validation grid (each setting its own cached cell), then the chosen setting on test, then mergekit.

    With a one-point grid there is nothing to choose, so the validation pass is skipped.
    """
    from splice.bench.cells import score
    from splice.bench.merging import config, settings, splice_merged
    from splice.merge.methods.registry import get_merge_method

    p = ctx.profile
    heads = {t.name: ctx.head(t.name) for t in ctx.tasks}
    method = get_merge_method(name)
    grid = settings(method, p.lambdas, p.densities)
    statistics: dict[str, Any] = {}  # computed on first use: a cached cell needs none
    kept: dict[int, Any] = {}  # the best merged encoder of this run's grid, kept to score it on test

    def merged(setting: dict[str, Any]) -> Any:
        calibration = None
        if method.needs:
            from splice.merge.calibration import Calibration

            if not statistics:
                statistics["cal"] = task_statistics(ctx, folders, set(method.needs))
            calibration = Calibration(data=dict(statistics["cal"].data))  # the merge closes (empties) its copy
        return splice_merged(config(name, ctx.base_dir, folders, setting), ctx.base, calibration, seed=p.seed,
                             progress=ctx.progress)
    tested: dict[str, Any] = {}  # the encoder scored on test in this run, which mergekit's is compared with
    tried: list[dict[str, Any]] = []
    for i, setting in enumerate(grid if len(grid) > 1 else []):
        def validate(i: int = i, setting: dict = setting) -> dict[str, Any]:
            try:
                model = merged(setting)
            except MERGE_ERRORS as exc:  # e.g. SLERP refuses more than two inputs
                return {"setting": setting, "error": _one_line(exc)}
            acc = score(model, ctx.tokenizer, ctx.tasks, heads, p.max_length, "val", ctx.progress)
            result = {"setting": setting, "val": acc, "val_normalized": normalized(acc, individual["val"])}
            if all(result["val_normalized"] > r["val_normalized"] for r in tried if "error" not in r):
                kept.clear()
                kept[i] = model
            return result
        tried.append(ctx.cell(f"merge/{kind}/{name}/val{i}", validate))

    def test() -> dict[str, Any]:
        ok = [(i, r) for i, r in enumerate(tried) if "error" not in r]
        if tried and not ok:
            return {"error": tried[0]["error"], "grid": tried}
        i, best = max(ok, key=lambda ir: (ir[1]["val_normalized"], -ir[0])) if ok else (0, {"setting": grid[0]})
        try:
            model = kept[i] if i in kept else merged(best["setting"])
        except MERGE_ERRORS as exc:
            return {"setting": best["setting"], "error": _one_line(exc)}
        tested["model"] = model
        acc = score(model, ctx.tokenizer, ctx.tasks, heads, p.max_length, "test", ctx.progress)
        return {"setting": best["setting"], "val_normalized": best.get("val_normalized"), "test": acc,
                "mean": sum(acc.values()) / len(acc), "normalized": normalized(acc, individual["test"]),
                "grid": tried}
    chosen = ctx.cell(f"merge/{kind}/{name}/test", test)
    if ctx.mergekit and "error" not in chosen:
        mergekit_cell(ctx, kind, name, folders, chosen, heads, individual,
                      lambda: tested.get("model") or merged(chosen["setting"]))


def max_abs_diff(ours: Any, theirs: Any) -> float | None:
    """Largest |ours − theirs| over every tensor of two models; None when their tensors do not pair up."""
    a, b = ours.state_dict(), theirs.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return None
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].numel())


def mergekit_cell(ctx: Any, kind: str, name: str, folders: list, chosen: dict, heads: dict,
                  individual: dict[str, dict[str, float]], ours: Callable[[], Any]) -> None:
    """mergekit's merge with splice's chosen setting, compared with splice's merged weights. Bit-identical weights
    score identically, so their test accuracy is splice's and is not computed twice."""
    from splice.bench.cells import score
    from splice.bench.merging import config, mergekit_merged, mergekit_methods

    if name not in mergekit_methods():
        return
    setting = chosen["setting"]

    def compute() -> dict[str, Any]:
        tmp = tempfile.mkdtemp(prefix="mergekit-", dir=ctx.root)
        try:
            from pathlib import Path

            model = mergekit_merged(config(name, ctx.base_dir, folders, setting), ctx.base, Path(tmp) / "out")
        except Exception as exc:  # mergekit's own errors are of many types; the report shows the line
            return {"setting": setting, "error": _one_line(exc)}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        diff = max_abs_diff(ours(), model)
        same = diff == 0.0
        acc = dict(chosen["test"]) if same else score(model, ctx.tokenizer, ctx.tasks, heads,
                                                       ctx.profile.max_length, "test", ctx.progress)
        return {"setting": setting, "test": acc, "mean": sum(acc.values()) / len(acc),
                "normalized": normalized(acc, individual["test"]), "max_abs_diff": diff, "same_weights": same}
    ctx.cell(f"mergekit/{kind}/{name}", compute)
