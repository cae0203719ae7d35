"""Merging many fine-tunes of one base: methods, planner, streaming executor.

    import splice
    splice.merge("merge.yaml", "merged-model")                        # mergekit YAML → a complete HF model folder
    splice.merge("merge.yaml", "merged-model", dry_run=True)          # validate everything, print the plan
    splice.merge(MergeConfig(merge_method="task_arithmetic", base_model="base",
                             models=[{"model": "ft-a", "parameters": {"weight": 0.7}},
                                     {"model": "ft-b", "parameters": {"weight": 0.3}}]), "out")

`splice.merge` is this package and is also callable as the function `merge` (`splice.merge.merge` is the same).

The pieces: `config.py` (the YAML schema), `inputs.py` (model folders and LoRA adapters, read lazily),
`plan.py` (config → one task per output tensor, all validation up front), `executor.py` (streams tasks to shards),
`lora_merge.py` (adapters in → one adapter out), `calibration.py` (Fisher / Gram extras for methods that need
them), `card.py` (README.md), and `methods/` (one file per merge method).
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from splice.errors import SpliceError
from splice.merge.config import MergeConfig, load_config
from splice.merge.executor import DEFAULT_SHARD_BYTES, execute
from splice.merge.plan import MergePlan, build_plan

__all__ = ["merge", "MergeConfig", "MergeReport", "load_config", "build_plan", "MergePlan"]


@dataclass
class MergeReport:
    """What a dry run found: the plan's summary and its size (nothing was written)."""

    summary: str
    num_tensors: int
    nbytes: int
    num_layers: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.summary


def merge(config: str | Path | dict[str, Any] | MergeConfig, out: str | Path, *, force: bool = False,
          dry_run: bool = False, progress: bool = True, calibration: str | Path | list[str] | None = None,
          seed: int = 0, out_format: Literal["model", "lora"] | None = None, lora_rank: int | None = None,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES, workers: int | None = None) -> Path | MergeReport:
    """Merge the models a mergekit-style config names, and write the result at `out`.

    Args:
        config: a YAML file, a dict of the same fields, or a `MergeConfig`.
        out: the output folder: an HF model folder (or a PEFT adapter folder with ``out_format="lora"``).
        force: replace `out` if it exists (atomically: the old folder stays until the new one is complete).
        dry_run: validate the config, every input's tensor names, shapes and dtypes, and the method's parameter
            values (on small stand-in tensors), and return the plan's summary without reading tensor data or
            writing anything.
        progress: show a progress bar (bytes/s) on stderr.
        calibration: for methods that need Fisher information or Gram matrices of layer inputs: a data file
            (CSV/JSONL with ``text`` or ``prompt`` + ``completion``, as ``splice train`` reads) or a list of texts,
            run through every merged model; or a folder saved by `splice.merge.calibration.Calibration.save`.
        seed: the seed of random methods (DARE, DELLA, ...); each tensor's generator is derived from it.
        out_format: "model" (default) or "lora": when every input is a LoRA adapter of the same base, write one
            adapter instead of a model (exact for weighted sums; see `splice.merge.lora_merge`).
        lora_rank: with ``out_format="lora"``, truncate the merged update of each module to this rank by SVD
            (implies ``out_format="lora"``).
        max_shard_bytes: the largest safetensors shard written.
        workers: tensors merged at once, each on one core (default: torch's thread count, at most 4); the bytes
            written do not depend on it. Memory grows with it.

    Returns:
        The output folder, or a `MergeReport` for a dry run.

    Raises:
        SpliceError: any invalid config or input, as one line naming the field, file or tensor; nothing written.
    """
    if workers is not None and workers < 1:
        raise SpliceError(f"workers: must be at least 1, got {workers}")
    fmt = out_format or ("lora" if lora_rank is not None else "model")
    if fmt not in ("model", "lora"):
        raise SpliceError(f"out_format: {fmt!r} is not one of model, lora")
    if lora_rank is not None and (fmt != "lora" or lora_rank < 1):
        raise SpliceError("lora_rank: needs out_format 'lora' and a positive rank")
    out = Path(out)
    if not dry_run and out.exists() and not force:
        raise SpliceError(f"{out}: output folder exists; pass --force to replace it")
    cfg, yaml_text = load_config(config)
    plan = build_plan(cfg)
    try:
        if fmt == "lora" and plan.method.needs:  # the LoRA path merges factors and never runs calibration
            raise SpliceError(f"out_format lora: merge_method {plan.method.name!r} needs "
                              f"{', '.join(sorted(plan.method.needs))} from calibration texts, which only the model "
                              "output computes; merge to a model (the default output)")
        if fmt == "lora":
            from splice.merge.lora_merge import LoraMerge

            lora = LoraMerge(plan, rank=lora_rank, seed=seed)  # checks every input is an adapter of the base
        if plan.method.needs and fmt == "model" and calibration is None:
            raise SpliceError(f"merge_method {plan.method.name!r} needs {', '.join(sorted(plan.method.needs))} "
                              f"computed from calibration texts: pass calibration (--calibration FILE)")
        if dry_run:
            from splice.merge.executor import check_parameters

            check_parameters(plan)
            summary = plan.summary()
            if fmt == "lora":
                summary += "\n" + lora.summary()
            return MergeReport(summary, len(plan.tasks), plan.nbytes, plan.num_layers, list(plan.notes))
        for note in plan.notes:
            print(f"note: {note}", file=sys.stderr)
        if fmt == "lora":
            return lora.write(out, yaml_text, force=force, progress=progress)
        extras = None
        if plan.method.needs:
            from splice.merge.calibration import PlanExtras

            extras = PlanExtras.build(plan, calibration, progress=progress)
        try:
            return execute(plan, out, yaml_text, force=force, progress=progress, seed=seed,
                           max_shard_bytes=max_shard_bytes, extras=extras, workers=workers)
        finally:
            if extras is not None:
                extras.close()
    finally:
        plan.inputs.close()


class _CallableModule(types.ModuleType):
    """Lets `splice.merge(config, out)` call `merge` while `splice.merge.config` etc. stay importable modules."""

    def __call__(self, *args: Any, **kwargs: Any) -> Path | MergeReport:
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
