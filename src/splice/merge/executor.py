"""Stream a `MergePlan` to disk: one output tensor at a time, bounded memory, atomic output.

For each task the executor reads the tensors of that one name from every input (memory-mapped), rounds them to
the config's ``dtype`` when one is set (mergekit reads inputs in that dtype), computes in float32 (float64 for
float64 inputs), casts to the output dtype and hands the result to the sharded writer; then it drops them. Peak
memory is O(inputs × largest tensor), never O(model): the output's layout is known from the plan, so each shard's
header is written first and every tensor's bytes are appended as soon as it is computed (`write_planned_shards`).

Method call, per `MergeMethod.space`:

- ``delta``: ``τ = fn(base, [θ_i − base ...], ctx=..., **params)`` and the output is ``base + τ``. An adapter input
  contributes its exact update ``s·B·A`` rather than the rounded difference ``(base + s·B·A) − base``.
- ``weights``: ``fn(base_or_None, [θ_i ...], ctx=..., **params)`` is the output.

Integer tensors (buffers) are copied when every input agrees, else refused. Random methods draw from
``ctx.generator``, seeded from (seed, tensor name): the same config and seed give the same bytes, whatever the
order or subset of tensors.

The output folder (config.json with the new dtype and layer count, generation config, tokenizer, safetensors shards
with an HF index, README.md with the config) is written inside `atomic_output_dir`: a failure or Ctrl-C leaves no
partial folder and an existing one untouched.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import math
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.io.checkpoints import atomic_output_dir, write_json
from splice.io.models import TOKENIZER_FILES, copy_model_files
from splice.io.stream_writer import write_planned_shards
from splice.merge.card import model_card
from splice.merge.config import torch_dtype
from splice.merge import blocks
from splice.merge.blocks import BlockSource
from splice.merge.inputs import ModelFolder, check_finite
from splice.merge.methods.registry import TensorContext
from splice.merge.plan import MergePlan, Source, TensorTask

__all__ = ["execute", "merge_tensor", "tensor_generator", "DEFAULT_SHARD_BYTES"]

MAX_WORKERS = 4  # tensors in flight at most (memory grows with it: O(workers × inputs × largest whole tensor))
DEFAULT_SHARD_BYTES = 2 * 2**30  # the output's largest shard file (memory does not depend on it)
# config.json keys that hold the number of transformer blocks, by family.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name): independent of tensor order, stable across runs."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def merge_tensor(plan: MergePlan, task: TensorTask, *, seed: int = 0,
                 extras: dict[str, list[Tensor]] | None = None, min_block: int | None = None,
                 dtype: torch.dtype | None = None) -> Tensor:
    """Compute one output tensor of `plan` (in `dtype`, by default `task.dtype`).

    A tensor of `min_block` entries or more is merged in row blocks when its method has a blocked form and every
    input is a model folder (memory-mapped); others are merged whole.

    Raises:
        SpliceError: NaN/inf in an input or in the method's result (or a result too large for `dtype`), integer
            tensors that differ between inputs, a result of the wrong shape; each naming the tensor.
    """
    dtype = dtype or task.dtype
    # Memory-mapped reads of this one name; NaN/inf is checked on the float32 working copies below (faster there).
    raw = {s: s.input.get(s.name, check=False) for s in task.sources}
    first = raw[task.sources[0]]
    if not first.is_floating_point():
        for s, t in raw.items():
            if t.dtype != first.dtype or not torch.equal(t, first):
                raise SpliceError(f"{s.input.where}: integer tensor {s.name!r} differs from the other inputs'; "
                                  f"splice copies integer buffers only when all inputs agree")
        return first.clone()
    rounding = torch_dtype(plan.config.dtype)
    work = torch.float64 if any(t.dtype == torch.float64 for t in raw.values()) else torch.float32

    def prepared(s: Source) -> Tensor:
        # Always a private copy: reads share the reader's memory-mapped storage, which a method must not change.
        t = raw[s]
        return check_finite((t.to(rounding) if rounding is not None else t).to(work, copy=True), s.input.where, s.name)

    method = plan.method
    ctx = TensorContext(name=task.name, layer=task.layer, num_layers=task.num_layers,
                        generator=tensor_generator(seed, task.name), extras=dict(extras or {}))
    if work == torch.float32 and runs_in_blocks(plan, task, bool(ctx.extras), min_block):
        return _merge_blocks(plan, task, raw, ctx, rounding, dtype)
    base = prepared(task.base) if task.base is not None else None
    if method.space == "delta":
        assert base is not None  # the config check refuses a delta method without base_model
        deltas = []
        for s in task.inputs:
            # The input's own delta is the task vector only against the same tensor of its base (a slice may pair
            # layer 2+k of a LoRA input with layer k of the base: that difference includes W_{2+k} − W_k).
            exact = (s.input.delta(s.name, task.base.input) if rounding is None and s.name == task.base.name
                     else None)
            deltas.append(exact.to(work) if exact is not None else prepared(s).sub_(base))
        out = method.fn(base, deltas, ctx=ctx, **task.params, **task.model_params).to(work)
        del deltas
        out = out.add_(base) if out.data_ptr() != base.data_ptr() else base + out
    else:
        out = method.fn(base, [prepared(s) for s in task.inputs], ctx=ctx, **task.params, **task.model_params)
    if tuple(out.shape) != tuple(task.shape):
        raise SpliceError(f"merge method {method.name!r} returned shape {tuple(out.shape)} for tensor {task.name!r}, "
                          f"expected {tuple(task.shape)}")
    return _finished(out, dtype, method.name, task.name)


def check_parameters(plan: MergePlan) -> None:
    """Run the method once per distinct parameter set on small stand-in tensors, so that a dry run refuses a value
    the method would refuse mid-merge (a density of 1.5, a DELLA ε past its density).

    Only SpliceErrors count, and only parameter checks raise them on stand-ins this size: anything else (math that
    needs the real shapes) is left to the real tensors. Methods that need calibration statistics are not run.
    """
    method = plan.method
    if method.needs:
        return
    seen = set()
    for task in plan.tasks:
        key = repr((task.params, task.model_params, len(task.inputs), len(task.shape), task.base is None))
        if not task.dtype.is_floating_point or key in seen:
            continue
        seen.add(key)
        g = torch.Generator().manual_seed(0)
        shape = (max(8, 2 * len(task.inputs)),) * max(len(task.shape), 1)
        base = torch.randn(shape, generator=g)
        models = [base + 0.1 * torch.randn(shape, generator=g) for _ in task.inputs]
        ctx = TensorContext(name=task.name, layer=task.layer, num_layers=task.num_layers, generator=g)
        try:
            if method.space == "delta":
                method.fn(base, [m - base for m in models], ctx=ctx, **task.params, **task.model_params)
            else:
                method.fn(base if task.base is not None else None, models, ctx=ctx, **task.params,
                          **task.model_params)
        except SpliceError:
            raise
        except Exception:  # noqa: BLE001 - the stand-ins cannot judge this method; the real tensors will
            pass


def _finished(t: Tensor, dtype: torch.dtype, method: str, name: str) -> Tensor:
    """`t` in `dtype`, refusing NaN/inf from the method and values a narrower dtype turns into inf (float16 ends at
    65504)."""
    out = t.to(dtype)
    if out.dtype == t.dtype:
        return check_finite(out, f"merge method {method!r}", name)
    if not out.is_floating_point():
        return out
    # One reduction over the cast result catches both; only a failure looks at `t` again to say which it was.
    if not math.isfinite(out.sum(dtype=torch.float32).item()) and not bool(torch.isfinite(out).all()):
        check_finite(t, f"merge method {method!r}", name)
        raise SpliceError(f"merge method {method!r}: tensor {name!r} has values up to {t.abs().max().item():.4g}, "
                          f"beyond {str(dtype).removeprefix('torch.')}; lower the weights or pick a wider out_dtype")
    return out


def _merge_blocks(plan: MergePlan, task: TensorTask, raw: dict[Source, Tensor], ctx: TensorContext,
                  rounding: torch.dtype | None, dtype: torch.dtype) -> Tensor:
    """`merge_tensor` in row blocks (see splice.merge.blocks): the output in its dtype plus O(block) working memory."""
    method = plan.method
    def prepare(rows: Tensor, i: int) -> Tensor:
        s = task.base if i < 0 else task.inputs[i]
        t = rows.to(rounding) if rounding is not None else rows
        return check_finite(t.to(torch.float32, copy=True), s.input.where, s.name)

    source = BlockSource(raw[task.base] if task.base is not None else None, [raw[s] for s in task.inputs], prepare,
                         deltas=method.space == "delta")
    out = torch.empty(task.shape, dtype=dtype)
    for rows, block in method.blocks(source, ctx=ctx, **task.params, **task.model_params):
        block = block.to(torch.float32)
        if method.space == "delta":
            base = source.base_block(rows)
            block = block.add_(base) if block.data_ptr() != base.data_ptr() else base + block
        if tuple(block.shape) != tuple(out[rows].shape):
            raise SpliceError(f"merge method {method.name!r} returned a block of shape {tuple(block.shape)} for "
                              f"rows {rows.start}:{rows.stop} of tensor {task.name!r}, expected {tuple(out[rows].shape)}")
        out[rows] = _finished(block, dtype, method.name, task.name)
    return out


def runs_in_blocks(plan: MergePlan, task: TensorTask, extras: bool = False, min_block: int | None = None) -> bool:
    """Whether `task` is merged in row blocks (memory O(block)): a large ≥2-D float tensor (float64 inputs are
    merged whole), every input a memory-mapped model folder, a method with a blocked form and no extra inputs."""
    return (plan.method.blocks is not None and not extras and len(task.shape) >= 2
            and task.shape.numel() >= (blocks.MIN_ELEMENTS if min_block is None else min_block)
            and all(isinstance(s.input, ModelFolder) for s in task.sources))


def _large_and_whole(plan: MergePlan, task: TensorTask) -> bool:
    return task.shape.numel() >= blocks.MIN_ELEMENTS and not runs_in_blocks(plan, task)


def compute_order(plan: MergePlan) -> list[TensorTask]:
    """The order tensors are computed and written in: the large ones merged in row blocks (the embeddings and the
    output head, each several times a layer's matrices) first, then the rest in the plan's order. Last in line, a
    large tensor would run alone on one core while the other workers had nothing left to do; first, the smaller ones
    fill in beside it. A large tensor merged whole keeps its place: it takes several copies of itself in memory, and
    two of them side by side would double that (`_stream` runs one at a time). Names, not positions, identify
    tensors in safetensors files and their index, so the order changes no loader."""
    early = [t for t in plan.tasks if t.shape.numel() >= blocks.MIN_ELEMENTS and runs_in_blocks(plan, t)]
    chosen = {id(t) for t in early}
    return early + [t for t in plan.tasks if id(t) not in chosen]


def _workers() -> int:
    """Tensors merged at once: one per torch thread (most of a merge's kernels, the histograms and masked selects of
    sparsification among them, run on one core each; whole tensors side by side keep every core busy)."""
    return max(1, min(MAX_WORKERS, torch.get_num_threads()))


@contextlib.contextmanager
def _single_threaded_torch(workers: int) -> Iterator[None]:
    # The workers are the parallelism: torch's own intra-op threads on top would oversubscribe the cores.
    before = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stream(plan: MergePlan, seed: int, progress: bool,
            extras: Any = None, workers: int | None = None) -> Iterator[tuple[str, Tensor]]:
    """The merged tensors in plan order, up to `workers` of them computed at once; each task's inputs are asked
    from disk (prefetched) as it is queued, so reads overlap the compute of the tensors before it."""
    workers = workers if workers is not None else _workers()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc="merging",
                   file=sys.stderr, dynamic_ncols=True)

    whole = threading.Semaphore(1)  # large tensors merged whole: one at a time (memory: several copies each)

    def compute(task: TensorTask, found: Any) -> Tensor:
        if _large_and_whole(plan, task):
            with whole:
                return merge_tensor(plan, task, seed=seed, extras=found)
        return merge_tensor(plan, task, seed=seed, extras=found)

    tasks = iter(compute_order(plan))
    queued: collections.deque[tuple[TensorTask, Any, Future[Tensor] | None]] = collections.deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="splice-merge") if workers > 1 else None

    def queue_next() -> None:
        task = next(tasks, None)
        if task is None:
            return
        for s in task.sources:
            s.input.prefetch(s.name)
        found = extras.for_task(task) if extras is not None else None
        queued.append((task, found, pool.submit(compute, task, found) if pool is not None else None))

    try:
        with _single_threaded_torch(workers):
            for _ in range(workers + 1):  # one more than are computing: its reads start early
                queue_next()
            while queued:
                task, found, future = queued.popleft()
                result = future.result() if future is not None else compute(task, found)
                queue_next()
                if bar is not None:
                    bar.set_postfix_str(task.name, refresh=False)
                    bar.update(task.nbytes)
                yield task.name, result
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()


def output_config(plan: MergePlan) -> dict[str, Any]:
    """The donor's config.json with the output dtype and (for slices) the output layer count."""
    config = dict(plan.donor.config)
    dtype = plan.config.out_dtype or plan.config.dtype
    if dtype:
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = dtype
    if plan.config.slices:
        old = next((config[k] for k in _LAYER_KEYS if isinstance(config.get(k), int)), None)
        for key in _LAYER_KEYS:
            if isinstance(config.get(key), int):
                config[key] = plan.num_layers
        # Per-layer lists (e.g. Qwen's / Gemma's layer_types) follow their layers into the new order.
        for key, value in list(config.items()):
            if isinstance(value, list) and old is not None and len(value) == old and old > 0:
                config[key] = [value[i] for i in plan.layer_map]
    return config


def write_support_files(plan: MergePlan, folder: Path, yaml_text: str, name: str, seed: int = 0) -> None:
    """config.json, generation_config.json, tokenizer files and README.md of the output model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer is reported below, in one line
        copied = copy_model_files(plan.tokenizer_from, folder) if Path(plan.tokenizer_from).is_dir() else []
    if not set(copied) & set(TOKENIZER_FILES):
        print(f"note: {plan.tokenizer_from} has no tokenizer files, so the output has none either", file=sys.stderr)
    if plan.donor.config:
        write_json(folder / "config.json", output_config(plan))
    gen = plan.donor.folder / "generation_config.json"
    if gen.is_file() and plan.tokenizer_from != plan.donor.folder:
        shutil.copy2(gen, folder / "generation_config.json")
    (folder / "README.md").write_text(model_card(plan, yaml_text, name, seed=seed), encoding="utf-8")


def execute(plan: MergePlan, out: str | Path, yaml_text: str, *, force: bool = False, progress: bool = True,
            seed: int = 0, max_shard_bytes: int = DEFAULT_SHARD_BYTES, extras: Any = None,
            workers: int | None = None) -> Path:
    """Run `plan` and write a complete HF model folder at `out`, atomically.

    Args:
        yaml_text: the config as YAML, for the model card.
        force: replace an existing `out` (atomically).
        seed: the global seed of random methods (per tensor: see `tensor_generator`).
        max_shard_bytes: the largest shard; more shards get an HF index.
        extras: per-tensor extra inputs for methods that declare `needs` (see `splice.merge.calibration`).
        workers: tensors computed at once (default `_workers()`); the output does not depend on it.

    Returns:
        The output folder.
    """
    out = Path(out)
    with atomic_output_dir(out, force=force) as tmp:
        write_support_files(plan, tmp, yaml_text, out.name, seed)
        layout = [(task.name, task.shape, task.dtype) for task in compute_order(plan)]
        write_planned_shards(layout, _stream(plan, seed, progress, extras, workers), tmp, max_shard_bytes=max_shard_bytes)
    return out

