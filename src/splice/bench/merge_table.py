"""Cells of the merge table: for each kind of delta and each registered merge method, choose the setting on the
validation split (mean normalized accuracy: merged ÷ the task's own fine-tune), then score it on test; and where
mergekit has the method, score mergekit's merge of the same inputs with the same setting.
"""
from __future__ import annotations

import shutil
import tempfile
from typing import Any

from splice.errors import SpliceError


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


def run_merges(ctx: Any) -> None:
    from splice.bench.quality import MERGE_INPUTS

    for kind, arm_key in MERGE_INPUTS.items():
        folders = [ctx.root / "finetunes" / kind / t.name for t in ctx.tasks]
        if not all((f / "config.json").is_file() for f in folders):
            continue  # the adapter stage has not produced every input yet (out of time)
        individual = {split: {t.name: ctx.store.get(f"adapt/{t.name}/{arm_key}")[key] for t in ctx.tasks}
                      for split, key in (("val", "val_accuracy"), ("test", "accuracy"))}
        for method in method_order():
            merge_cell(ctx, kind, method, folders, individual)


def _calibration(ctx: Any) -> list[str]:
    n = ctx.profile.calibration_per_task
    return [text for t in ctx.tasks for text in t.val.texts[:n]]


def merge_cell(ctx: Any, kind: str, name: str, folders: list, individual: dict[str, dict[str, float]]) -> None:
    """Validation grid (each setting its own cached cell), then the chosen setting on test, then mergekit."""
    from splice.bench.cells import score
    from splice.bench.merging import config, settings, splice_merged
    from splice.merge.methods.registry import get_merge_method

    p = ctx.profile
    heads = {t.name: ctx.head(t.name) for t in ctx.tasks}
    grid = settings(get_merge_method(name), p.lambdas, p.densities)
    tried = []
    for i, setting in enumerate(grid):
        def validate(setting: dict = setting) -> dict[str, Any]:
            try:
                model = splice_merged(config(name, ctx.base_dir, folders, setting), ctx.base, _calibration(ctx),
                                      seed=p.seed, progress=ctx.progress)
            except (SpliceError, RuntimeError, ValueError, TypeError) as exc:  # e.g. SLERP refuses 8 inputs
                return {"setting": setting, "error": _one_line(exc)}
            acc = score(model, ctx.tokenizer, ctx.tasks, heads, p.max_length, "val", ctx.progress)
            return {"setting": setting, "val": acc, "val_normalized": normalized(acc, individual["val"])}
        tried.append(ctx.cell(f"merge/{kind}/{name}/val{i}", validate))
    ok = [r for r in tried if "error" not in r]

    def test() -> dict[str, Any]:
        if not ok:
            return {"error": tried[0]["error"], "grid": tried}
        best = max(ok, key=lambda r: r["val_normalized"])  # the first of equals: grid order is deterministic
        model = splice_merged(config(name, ctx.base_dir, folders, best["setting"]), ctx.base, _calibration(ctx),
                              seed=p.seed, progress=ctx.progress)
        acc = score(model, ctx.tokenizer, ctx.tasks, heads, p.max_length, "test", ctx.progress)
        return {"setting": best["setting"], "val_normalized": best["val_normalized"], "test": acc,
                "mean": sum(acc.values()) / len(acc), "normalized": normalized(acc, individual["test"]),
                "grid": tried}
    chosen = ctx.cell(f"merge/{kind}/{name}/test", test)
    if ctx.mergekit and "error" not in chosen:
        mergekit_cell(ctx, kind, name, folders, chosen["setting"], heads, individual)


def mergekit_cell(ctx: Any, kind: str, name: str, folders: list, setting: dict, heads: dict,
                  individual: dict[str, dict[str, float]]) -> None:
    from splice.bench.cells import score
    from splice.bench.merging import config, mergekit_merged, mergekit_methods

    if name not in mergekit_methods():
        return

    def compute() -> dict[str, Any]:
        tmp = tempfile.mkdtemp(prefix="mergekit-", dir=ctx.root)
        try:
            from pathlib import Path

            model = mergekit_merged(config(name, ctx.base_dir, folders, setting), ctx.base, Path(tmp) / "out")
        except Exception as exc:  # mergekit's own errors are of many types; the report shows the line
            return {"setting": setting, "error": _one_line(exc)}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        acc = score(model, ctx.tokenizer, ctx.tasks, heads, ctx.profile.max_length, "test", ctx.progress)
        return {"setting": setting, "test": acc, "mean": sum(acc.values()) / len(acc),
                "normalized": normalized(acc, individual["test"])}
    ctx.cell(f"mergekit/{kind}/{name}", compute)
