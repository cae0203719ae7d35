"""Config → the list of output tensors, each a `TensorTask`; every input is validated here, before any data is read.

The tensor names come from the checkpoints themselves (no architecture tables): a name with a block index
(``layers.N.``, ``h.N.``, ``layer.N.``, ``blocks.N.``) belongs to layer N, every other name is a non-layer tensor.

- ``models:`` — one output tensor per tensor of the base (or of the first model when there is no base), read under
  the same name from every input. A gradient parameter is evaluated at ``t = N / (num_layers - 1)`` for layer N and
  at ``t = 0`` for non-layer tensors, as in mergekit.
- ``slices:`` — layer stacking ("frankenmerges"). Each output slice takes layers ``[start, end)`` of each of its
  sources; output layers are numbered on from the previous slice, so ``model.layers.5.*`` of a source may become
  ``model.layers.12.*`` of the output. Embedding-like non-layer tensors come from the first slice's sources, the
  others (final norm, output head) from the last slice's, as mergekit's pre/post weights do. ``t`` restarts at 0 in
  every slice.

Which inputs a method sees (`TensorTask.inputs`): with a base-aware method (delta space, SLERP, ...) the base is
passed as ``base`` and the other models as ``tensors``. Methods that ignore the base (mergekit's "ignored" base
policy: linear, karcher, passthrough) get the base as one more input, added when the config does not list it among
the models, as mergekit does.

Validation, each failure one line naming the input's place in the config, its path and the tensor: missing
tensors, different shapes, floating vs integer dtypes, different architectures (config.json ``model_type`` /
``architectures``) or layer counts, a parameter that resolves to nothing for some tensor.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from splice.errors import SpliceError, closest
from splice.merge.config import MergeConfig, ModelRef, base_as_input, evaluate_setting, torch_dtype
from splice.merge.inputs import InputSet, MergeInput, local_folder
from splice.merge.methods.registry import MergeMethod, get_merge_method

__all__ = ["MergePlan", "TensorTask", "Source", "build_plan", "layer_of"]

# Block index in a tensor name: "model.layers.3.mlp..." (Llama), "transformer.h.3..." (GPT-2),
# "encoder.layer.3..." (BERT), "blocks.3..." (ViT and others), "encoder.block.3.layer.1..." (T5: the leftmost
# match is the block, not its sub-layer).
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")
# Non-layer tensors that sit before the blocks (from the first slice in a frankenmerge); the rest sit after them
# (GPT-NeoX's output head `embed_out` among them).
_PRE = re.compile(r"embed(?!_out)|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|tok_embeddings|"
                  r"embed_in|patch_embed|cls_token|pos_embed")
# Where a checkpoint without `lm_head.weight` keeps the tied embedding it stands for.
_TIED = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
                            "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight", "embed_tokens.weight",
                            "wte.weight")}


def layer_of(name: str) -> re.Match[str] | None:
    """The block-index match in a tensor name (group 1 is the index), or None for a non-layer tensor."""
    return _LAYER.search(name)


def _renumber(name: str, match: re.Match[str], index: int) -> str:
    return f"{name[:match.start(1)]}{index}{name[match.end(1):]}"


@dataclass(frozen=True)
class Source:
    """One tensor of one input."""

    input: MergeInput
    name: str


@dataclass
class TensorTask:
    """One output tensor: where to read it from, and with which parameters to merge it.

    Attributes:
        name: the output tensor name.
        inputs: what the method gets as `tensors` (weights space) or takes task vectors of (delta space).
        base: the base tensor, or None when the config has no base.
        params: global parameters resolved for this tensor.
        model_params: per-model parameters, each a list aligned with `inputs`.
        layer, num_layers: the output block index and the output's block count (None outside the blocks).
        shape, dtype: the output tensor's shape and dtype.
    """

    name: str
    inputs: list[Source]
    base: Source | None
    params: dict[str, Any]
    model_params: dict[str, list[Any]]
    layer: int | None
    num_layers: int | None
    shape: torch.Size
    dtype: torch.dtype

    @property
    def sources(self) -> list[Source]:
        """Every tensor read for this task, each once (the base first)."""
        out = [self.base] if self.base is not None else []
        return out + [s for s in self.inputs if s not in out]

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


@dataclass
class MergePlan:
    """Everything `execute` needs: the config, the method, the opened inputs and one task per output tensor."""

    config: MergeConfig
    method: MergeMethod
    inputs: InputSet
    base: MergeInput | None
    donor: MergeInput  # a full model: config.json and generation_config.json come from it
    tokenizer_from: Path  # the folder whose tokenizer files are copied
    tasks: list[TensorTask]
    num_layers: int  # blocks in the output
    layer_map: list[int] = field(default_factory=list)  # output block → block of the donor it comes from
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)

    def summary(self) -> str:
        """A few lines for --dry-run: method, inputs, output tensors and bytes, per-parameter ranges."""
        lines = [f"merge_method: {self.method.name} ({self.method.space} space)"
                 + (f"  {self.method.reference}" if self.method.reference else "")]
        seen: list[MergeInput] = []
        for t in self.tasks:
            for s in t.sources:
                if s.input not in seen:
                    seen.append(s.input)
        for inp in seen:
            kind = "adapter" if inp is not self.base and hasattr(inp, "adapter") else "model"
            role = "base, " if inp is self.base else ""
            lines.append(f"  input  {inp.where}  ({role}{kind}, {len(inp.keys())} tensors)")
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in self.tasks})
        lines.append(f"output: {len(self.tasks)} tensors, {_size(self.nbytes)}, {self.num_layers} layers, "
                     f"dtype {', '.join(dtypes)}")
        for key, (lo, hi) in _ranges(self.tasks).items():
            lines.append(f"  {key}: {lo}" + (f" .. {hi}" if hi != lo else ""))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _ranges(tasks: list[TensorTask]) -> dict[str, tuple[Any, Any]]:
    """For each parameter (per-model ones as name[i]), its smallest and largest value over the tensors."""
    values: dict[str, list[Any]] = {}
    for t in tasks:
        for k, v in t.params.items():
            values.setdefault(k, []).append(v)
        for k, vs in t.model_params.items():
            for i, v in enumerate(vs):
                values.setdefault(f"{k}[{i}]", []).append(v)
    out = {}
    for k, vs in values.items():
        try:
            out[k] = (min(vs), max(vs))
        except TypeError:
            out[k] = (vs[0], vs[0])
    return out


@dataclass
class _Group:
    """The sources of one output slice (the whole model for a `models:` config)."""

    where: str
    refs: list[ModelRef]  # one per source, config order
    wheres: list[str]
    ranges: list[tuple[int, int] | None]  # layer range of each source (None: all layers)
    params: list[dict[str, Any]]  # each source's own parameters
    slice_params: dict[str, Any]
    base: ModelRef | None


def _groups(cfg: MergeConfig) -> list[_Group]:
    if cfg.models:
        refs = [m.model for m in cfg.models]
        group = _Group("models", refs, [f"models[{i}]" for i in range(len(refs))], [None] * len(refs),
                       [m.parameters or {} for m in cfg.models], {}, cfg.base_model)
        if cfg.base_model is not None and cfg.base_model not in refs:
            # mergekit adds the base as one more source; only methods that use it as an input will see it.
            group.refs.append(cfg.base_model)
            group.wheres.append("base_model")
            group.ranges.append(None)
            group.params.append({})
        return [group]
    return [_Group(f"slices[{i}]", [s.model for s in sl.sources], [f"slices[{i}].sources[{j}]"
                                                                      for j in range(len(sl.sources))],
                   [tuple(s.layer_range) for s in sl.sources], [s.parameters or {} for s in sl.sources],
                   sl.parameters or {}, sl.base_model or cfg.base_model)
            for i, sl in enumerate(cfg.slices or [])]


def build_plan(cfg: MergeConfig) -> MergePlan:
    """Open and check every input and resolve every output tensor's sources and parameters.

    Raises:
        SpliceError: any invalid input (see the module docstring); nothing has been written.
    """
    method = get_merge_method(cfg.merge_method)
    inputs = InputSet()
    try:
        return _Planner(cfg, method, inputs).plan()
    except BaseException:
        inputs.close()
        raise


def _vocab_size(config: dict[str, Any]) -> int | None:
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if isinstance(size, int) else None


def _check_vocabulary(folder: Path, output_config: dict[str, Any]) -> None:
    """Refuse a tokenizer_source whose model has another vocabulary size than the merged embeddings: mergekit
    realigns the embeddings to it (vocabulary surgery), splice only copies its files, which would then not match."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return  # a bare tokenizer folder: nothing to compare against without loading it
    try:
        theirs = _vocab_size(json.loads(path.read_text()))
    except (OSError, ValueError):
        return
    ours = _vocab_size(output_config)
    if theirs is not None and ours is not None and theirs != ours:
        raise SpliceError(f"tokenizer_source: {folder} has a vocabulary of {theirs} tokens, the merged model's "
                          f"embeddings {ours} rows; splice does not realign embeddings to another vocabulary "
                          "(mergekit's tokenizer surgery), so pick a model with the same vocabulary")


# Buffers, not weights: derived from the config (positions, RoPE frequencies, masks), so an input that lacks one
# loses nothing, and a merge that leaves it out loads the same.
_BUFFERS = {"position_ids", "inv_freq", "masked_bias", "token_type_ids"}


def _present(inp: MergeInput, name: str) -> bool:
    return name in inp or any(a in inp for a in _TIED.get(name, ()))


class _Planner:
    def __init__(self, cfg: MergeConfig, method: MergeMethod, inputs: InputSet) -> None:
        self.cfg, self.method, self.inputs = cfg, method, inputs
        self.notes = list(cfg.notes())
        self.with_base = base_as_input(method)
        self.dropped: list[str] = []

    def plan(self) -> MergePlan:
        cfg = self.cfg
        if cfg.base_model is not None:
            self.inputs.base = self.inputs.open(cfg.base_model, "base_model")
        groups = _groups(cfg)
        opened = [[self.inputs.open(r, w) for r, w in zip(g.refs, g.wheres)] for g in groups]
        for g in groups:
            if g.base is not None and g.base not in g.refs and self.method.needs_base:
                raise SpliceError(f"{g.where}: base_model {str(g.base)!r} is not among the slice's sources")
        ref_input = self.inputs.base or opened[0][0]
        self._check_architectures(ref_input, [i for row in opened for i in row])
        if self.with_base and cfg.base_model is not None and cfg.models and cfg.base_model not in \
                [m.model for m in cfg.models]:
            self.notes.append(f"{self.method.name} merges base_model as one more model (as mergekit does)")
        tasks, layer_map = self._tasks(groups, opened, ref_input)
        donor = self.inputs.base or opened[0][0]
        donor = getattr(donor, "base", donor)  # an adapter's config and tokenizer are its base model's
        tok = cfg.tokenizer_source
        tokenizer_from = (donor.folder if tok in (None, "base") else
                          local_folder(tok.path, tok.revision, "tokenizer_source"))
        if tokenizer_from != donor.folder:
            _check_vocabulary(tokenizer_from, donor.config)
        return MergePlan(cfg, self.method, self.inputs, self.inputs.base, donor, tokenizer_from, tasks,
                         len(layer_map), layer_map, self.notes)

    # ---- validation -------------------------------------------------------------------------------------

    def _check_architectures(self, ref: MergeInput, others: list[MergeInput]) -> None:
        def arch(i: MergeInput) -> tuple[Any, Any]:
            return i.config.get("model_type"), tuple(i.config.get("architectures") or ())

        want = arch(ref)
        for inp in others:
            got = arch(inp)
            if got != want and all(got) and all(want):
                raise SpliceError(f"{inp.where}: architecture {', '.join(got[1]) or '?'} ({got[0]}) differs from "
                                  f"{ref.where}'s {', '.join(want[1]) or '?'} ({want[0]}); splice merges models of "
                                  f"one architecture")

    def _source(self, inp: MergeInput, name: str, ref: MergeInput, ref_name: str) -> Source:
        """The tensor `name` of `inp`, checked against `ref_name` of the reference input."""
        if name not in inp:
            alias = next((a for a in _TIED.get(name, ()) if a in inp), None)
            if alias is None:
                raise SpliceError(f"{inp.where}: tensor {name!r} is missing ({ref.where} has it)"
                                  f"{closest(name, inp.keys())}")
            name = alias
        if inp.shape(name) != ref.shape(ref_name):
            raise SpliceError(f"{inp.where}: tensor {name!r} has shape {tuple(inp.shape(name))}, but "
                              f"{ref_name!r} of {ref.where} has {tuple(ref.shape(ref_name))}")
        if inp.dtype(name).is_floating_point != ref.dtype(ref_name).is_floating_point:
            raise SpliceError(f"{inp.where}: tensor {name!r} is {inp.dtype(name)}, but {ref_name!r} of {ref.where} "
                              f"is {ref.dtype(ref_name)}; cannot merge a floating-point with an integer tensor")
        return Source(inp, name)

    # ---- tasks ------------------------------------------------------------------------------------------

    def _tasks(self, groups: list[_Group], opened: list[list[MergeInput]],
               ref_input: MergeInput) -> tuple[list[TensorTask], list[int]]:
        pre, layers, post = _split_names(ref_input.keys())
        layer_ids: dict[str, set[int]] = {}  # each layer stack (encoder, decoder, vision tower) → its layer numbers
        for n in ref_input.keys():
            if (m := layer_of(n)) is not None:
                layer_ids.setdefault(n[:m.start()], set()).add(int(m.group(1)))
        stacks = sorted(layer_ids)
        if self.cfg.slices and len(stacks) > 1:  # one layer count for all of them would interleave the stacks
            raise SpliceError(f"slices: {ref_input.where} has {len(stacks)} layer stacks ({', '.join(stacks)}); "
                              "a frankenmerge of a model with several (an encoder-decoder, a vision tower) is not "
                              "supported, as in mergekit; merge it with models:")
        for inp in dict.fromkeys(i for row in opened for i in row):
            n = len(_split_names(inp.keys())[1])
            if n != len(layers) and self.cfg.models:
                raise SpliceError(f"{inp.where}: has {n} layers, {ref_input.where} has {len(layers)}")
        tasks: list[TensorTask | None] = []
        layer_map: list[int] = []
        total = (len(layers) if self.cfg.models else
                 sum((r[1] - r[0]) for g in groups for r in g.ranges[:1]))  # type: ignore[index]
        first, last = 0, len(groups) - 1
        for name in pre:
            tasks.append(self._task(groups[first], opened[first], ref_input, name, [name] * len(opened[first]),
                                    None, total, 0.0))
        out_layer = 0
        for g, row in zip(groups, opened):
            lo, hi = g.ranges[0] or (0, len(layers))
            length = hi - lo
            for k in range(length):
                t = k / (length - 1) if length > 1 else 1.0
                src_layer = lo + k
                ref = row[0] if self.cfg.slices else ref_input
                names = _layer_names(ref, src_layer)
                if not names:
                    raise SpliceError(f"{g.wheres[0]} {ref.where}: has no layer {src_layer} (it has "
                                      f"{len(_split_names(ref.keys())[1])} layers)")
                for ref_name, m in names:
                    out_name = _renumber(ref_name, m, out_layer)
                    src_names = [_renumber(ref_name, m, (r or (0, 0))[0] + k) for r in g.ranges]
                    n, t_here = total, t
                    if len(stacks) > 1:  # models: only; each stack (encoder, decoder, vision tower) on its own depth
                        n = len(layer_ids[ref_name[:m.start()]])
                        t_here = src_layer / (n - 1) if n > 1 else 1.0
                    tasks.append(self._task(g, row, ref, out_name, src_names, out_layer, n, t_here,
                                            ref_name=ref_name))
                layer_map.append(src_layer)
                out_layer += 1
        for name in post:
            tasks.append(self._task(groups[last], opened[last], ref_input, name, [name] * len(opened[last]),
                                    None, total, 0.0))
        if self.dropped:
            self.notes.append(f"{len(self.dropped)} buffer(s) that some inputs lack are not written (transformers "
                              f"rebuilds them on load), e.g. {self.dropped[0]!r}")
        tasks = [t for t in tasks if t is not None]
        extra = sorted({n for row in opened for i in row for n in i.keys()} - set(ref_input.keys()))
        if extra and self.cfg.models:
            self.notes.append(f"{len(extra)} tensor(s) that {ref_input.where} lacks are not merged, e.g. {extra[0]!r}")
        return tasks, layer_map  # type: ignore[return-value]  # the Nones are gone

    def _task(self, g: _Group, row: list[MergeInput], ref: MergeInput, out_name: str, src_names: list[str],
              layer: int | None, total: int, t: float, ref_name: str | None = None) -> TensorTask | None:
        ref_name = ref_name or out_name
        if ref_name.rsplit(".", 1)[-1] in _BUFFERS and any(not _present(inp, n) for inp, n in zip(row, src_names)):
            # Older checkpoints saved these; newer ones do not, and mergekit leaves them out too.
            self.dropped.append(out_name)
            return None
        sources = [self._source(inp, name, ref, ref_name) for inp, name in zip(row, src_names)]
        base_pos = g.refs.index(g.base) if g.base is not None and g.base in g.refs else None
        base = sources[base_pos] if base_pos is not None else None
        use = [i for i in range(len(sources)) if self.with_base or i != base_pos]
        params = self._shared(g, out_name, t)
        model_params = {key: [self._per_model(key, p, g, i, src_names[i], t) for i in use]
                        for key, p in self.method.model_params.items()
                        if any(key in s for s in [*(g.params[i] for i in use), g.slice_params,
                                                  self.cfg.parameters or {}])}
        dtypes = [s.input.dtype(s.name) for s in sources]
        dtype = dtypes[0]
        for d in dtypes[1:]:
            dtype = torch.promote_types(dtype, d)
        if dtype.is_floating_point:
            dtype = torch_dtype(self.cfg.out_dtype or self.cfg.dtype) or dtype
        return TensorTask(out_name, [sources[i] for i in use], base, params, model_params, layer,
                          total if layer is not None else None, ref.shape(ref_name), dtype)

    def _evaluate(self, key: str, kind: Any, scopes: list[dict[str, Any]], tensor: str, t: float) -> Any:
        for scope in scopes:
            if key in scope:
                try:
                    value = evaluate_setting(scope[key], tensor, t, kind)
                except ValidationError:
                    raise SpliceError(f"parameter {key!r}: the value for tensor {tensor!r} (t={t:g}) is not "
                                      f"{kind.__name__}") from None
                if value is not None:
                    return value
        return None

    def _shared(self, g: _Group, tensor: str, t: float) -> dict[str, Any]:
        out = {}
        for key, p in self.method.params.items():
            value = self._evaluate(key, p.kind, [g.slice_params, self.cfg.parameters or {}], tensor, t)
            if value is None and p.required:
                raise SpliceError(f"parameter {key!r} of {self.method.name!r} resolves to nothing for tensor "
                                  f"{tensor!r} (no filter matches it)")
            if value is not None:
                out[key] = value
        return out

    def _per_model(self, key: str, p: Any, g: _Group, i: int, tensor: str, t: float) -> Any:
        value = self._evaluate(key, p.kind, [g.params[i], g.slice_params, self.cfg.parameters or {}], tensor, t)
        if value is None:
            if p.required:
                raise SpliceError(f"{g.wheres[i]}: parameter {key!r} of {self.method.name!r} resolves to nothing "
                                  f"for tensor {tensor!r} (set it for this model, or a default under parameters)")
            value = p.default
        return value


def _split_names(names: list[str]) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """(pre-layer names, layer index → names, post-layer names), each in a stable order."""
    pre, post, layers = [], [], {}
    for n in names:
        m = layer_of(n)
        if m is not None:
            layers.setdefault(int(m.group(1)), []).append(n)
        elif _PRE.search(n):
            pre.append(n)
        else:
            post.append(n)
    return sorted(pre), dict(sorted(layers.items())), sorted(post)


def _layer_names(inp: MergeInput, index: int) -> list[tuple[str, re.Match[str]]]:
    out = []
    for n in sorted(inp.keys()):
        m = layer_of(n)
        if m is not None and int(m.group(1)) == index:
            out.append((n, m))
    return out

