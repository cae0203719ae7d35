"""The merge table: the task fine-tunes merged by every registered merge method, scored on every task.

Each merge runs through splice's own planner and per-tensor merge (`build_plan` + `merge_tensor`, the code
`splice merge` streams to disk) but keeps the result in memory, so a grid of settings costs no disk writes. The
settings grid is built from the method's parameter schema, so a newly registered method is benchmarked with no edit
here: λ over `lambda` (or over the per-model `weight` of delta methods without λ), density over `density`, 0.5 for
any other required number. The setting with the best mean normalized *validation* accuracy is then scored once on
test. A method that cannot merge these inputs (SLERP takes two models) is reported with its one-line error.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.errors import SpliceError

# Methods whose `density` does nothing unless a sparsifier is chosen (they would only repeat the same merge).
DENSITY_IGNORED = {"task_arithmetic", "generalized_task_arithmetic"}


def settings(method: Any, lambdas: tuple[float, ...], densities: tuple[float, ...]) -> list[dict[str, Any]]:
    """The grid of {"parameters": ..., "model": ...} settings tried for one registered merge method."""
    fixed_model: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    axes: list[tuple[str, str, tuple[float, ...]]] = []
    if "weight" in method.model_params:
        fixed_model["weight"] = 1.0
    if "lambda" in method.params:
        axes.append(("parameters", "lambda", lambdas))
    elif method.space == "delta" and "weight" in method.model_params:
        axes.append(("model", "weight", lambdas))
    if "density" in method.model_params and method.name not in DENSITY_IGNORED:
        axes.append(("model", "density", densities))
    for table, fixed_here in ((method.params, fixed), (method.model_params, fixed_model)):
        for name, p in table.items():
            if p.required and name not in fixed_here and not any(a[1] == name for a in axes):
                fixed_here[name] = 0.5 if p.kind in (float, int) else p.default
    out = []
    for values in itertools.product(*[a[2] for a in axes]):
        s = {"parameters": dict(fixed), "model": dict(fixed_model)}
        for (table, name, _), v in zip(axes, values):
            s[table][name] = v
        out.append(s)
    return out


def config(method: str, base: Path, models: list[Path], setting: dict[str, Any]) -> dict[str, Any]:
    """The mergekit-style config of one merge (the same dict is handed to splice and to mergekit).

    The base is named only for methods that need one: a soup such as `linear` would otherwise merge the base as
    one more model, as mergekit does.
    """
    from splice.merge.methods.registry import get_merge_method

    cfg: dict[str, Any] = {"merge_method": method,
                           "models": [{"model": str(m), "parameters": dict(setting["model"])} for m in models]}
    if get_merge_method(method).needs_base:
        cfg["base_model"] = str(base)
    if setting["parameters"]:
        cfg["parameters"] = dict(setting["parameters"])
    return cfg


def splice_merged(cfg: dict[str, Any], base: nn.Module, calibration: Any, seed: int = 0,
                  progress: bool = False) -> nn.Module:
    """A copy of `base` holding the merge `cfg` describes, computed tensor by tensor in memory.

    `calibration` (for the data-aware methods): texts each input is calibrated on, or a ready `Calibration`.
    """
    from splice.merge.config import load_config
    from splice.merge.executor import merge_tensor
    from splice.merge.plan import build_plan

    plan = build_plan(load_config(cfg)[0])
    extras = None
    try:
        if plan.method.needs:
            from splice.merge.calibration import PlanExtras

            extras = PlanExtras.build(plan, calibration, progress=progress, max_length=64)
        state = {t.name: merge_tensor(plan, t, seed=seed, extras=extras.for_task(t) if extras else None)
                 for t in plan.tasks}
    finally:
        if extras is not None:
            extras.close()
        plan.inputs.close()
    return load_state(base, state, f"merge_method {cfg['merge_method']!r}")


def load_state(base: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    model = copy.deepcopy(base)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    if missing:
        raise SpliceError(f"{what}: the merged weights lack {len(missing)} tensors of the model, e.g. {missing[0]!r}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model.eval()


def mergekit_methods() -> set[str]:
    """Names of mergekit's merge methods (empty when mergekit is not installed)."""
    try:
        from mergekit.merge_methods import registry
    except ImportError:
        return set()
    return {m.spec.name for m in registry.registered_methods()}


def mergekit_merged(cfg: dict[str, Any], base: nn.Module, out: Path) -> nn.Module:
    """The same merge run by mergekit (written to `out`, read back): its implementation, scored like ours."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    with _mergekit_alias_fix():
        run_merge(MergeConfiguration.model_validate({**cfg, "dtype": "float32"}), str(out),
                  options=MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, lazy_unpickle=False))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return load_state(base, state, "mergekit's merge")


@contextlib.contextmanager
def _mergekit_alias_fix() -> Iterator[None]:
    """mergekit 0.1.5 plans an optional weight (BERT's pooler) with `[name] + aliases`, a list + tuple TypeError, so
    it cannot merge any BERT. While this block runs, the aliases it is handed are lists; nothing else changes."""
    from mergekit.plan import MergePlanner

    original = MergePlanner.plan_tensor

    def plan_tensor(self: Any, weight: Any, weights_in: list, *args: Any, **kwargs: Any) -> Any:
        weights_in = [w.model_copy(update={"aliases": list(w.aliases)}) if w.aliases else w for w in weights_in]
        return original(self, weight, weights_in, *args, **kwargs)
    MergePlanner.plan_tensor = plan_tensor
    try:
        yield
    finally:
        MergePlanner.plan_tensor = original
