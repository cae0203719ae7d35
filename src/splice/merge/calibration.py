"""Calibration statistics for merge methods that need more than the weights (`MergeMethod.needs`).

    fisher:  F_i[W] = mean over calibration units of (∂L_i / ∂W)²     the diagonal empirical Fisher of model i,
                                                                       shaped like W (Fisher merging, Matena &
                                                                       Raffel, https://arxiv.org/abs/2111.09832)
    gram:    G_i[W] = Σ over calibration tokens x of x xᵀ              x: the input of the nn.Linear / HF Conv1D
                                                                       that owns W, so G is (in, in); padding
                                                                       excluded (RegMean, Jin et al.,
                                                                       https://arxiv.org/abs/2212.09849)

A unit of the Fisher is a batch, or one example with ``per_example=True`` (the paper's estimator). Its loss is a
causal LM's next-token loss on the texts, or a sequence classifier's loss on labelled rows; on unlabelled texts a
classifier's labels are drawn from its own prediction (the paper's Fisher is an expectation over p(y|x)). A model
without a task head has no loss, so it gets Grams only (or pass `loss_fn`).

The pieces: `compute_fisher` / `compute_gram` work on any module and batches; `calibrate_model` on one loaded
transformers model and texts; `calibrate` on model folders and a data file (CSV/TSV/JSONL as ``splice train``
reads it, a .txt with one text per line, or a list of texts); `Calibration` holds the result, one
``{tensor name: tensor}`` per model and kind (``get(kind, model_index, tensor_name)``), and saves/loads it as
safetensors files (read lazily). A merge gets them per tensor as ``ctx.extras[kind]`` (one tensor per model, aligned
with the method's ``tensors``) through `PlanExtras`, only where every model has one (Gram matrices exist for linear
layers only; the methods fall back to their weights-only rule elsewhere).

Grams are sums, not means, so every model must see the same data: every entry point runs the same batches (the
first `max_batches` of the data, in file order) through every model. Unlike the merge itself, calibrating needs each
model whole in memory once (an adapter is applied to its base); `PlanExtras` writes each model's statistics to a
temporary folder as soon as they are computed, so only one model's statistics are held in memory at a time.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from splice.errors import SpliceError, closest

__all__ = ["KINDS", "Calibration", "PlanExtras", "calibrate", "calibrate_model", "compute_fisher", "compute_gram",
           "plan_models", "read_texts"]

KINDS = ("fisher", "gram")
FORMAT = "splice-calibration"
INDEX_FILE = "calibration.json"

Batch = Any  # a dict of model inputs (model(**batch)), a tuple (model(*batch)) or one tensor (model(batch))


# ----------------------------------------------------------------------------------------------- statistics
def _forward(model: nn.Module, batch: Batch) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _gram_modules(model: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    """name → (module, is_conv1d) for every nn.Linear and HF Conv1D (whose weight is (in, out))."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional here: plain torch models have only nn.Linear
        Conv1D = None
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found[name] = (module, False)
        elif Conv1D is not None and isinstance(module, Conv1D):
            found[name] = (module, True)
    return found


def compute_gram(model: nn.Module, batches: Iterable[Batch]) -> dict[str, Tensor]:
    """Σ XᵀX of the inputs of every linear layer over `batches`, keyed by weight name ("<module>.weight").

    Args:
        model: any module; forward hooks are placed on its `nn.Linear` and HF `Conv1D` layers and removed after.
        batches: dicts of model inputs (``model(**batch)``), tuples or tensors. When a dict has an
            ``attention_mask`` of shape (batch, seq), input rows at masked (padding) positions are left out.

    Returns:
        (in, in) float32 Gram matrices on the CPU; a layer that no batch reached is absent.

    Raises:
        SpliceError: no batches.
    """
    modules = _gram_modules(model)
    grams: dict[str, Tensor] = {}
    mask_now: list[Tensor | None] = [None]

    def hook(name: str, n_in: int) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: tuple, _output: Any) -> None:
            x = inputs[0].detach()
            mask = mask_now[0]
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(device=x.device, dtype=torch.bool)]  # tokens only: padding carries no signal
            elif mask is not None and x.dim() == 2 and mask.dim() == 2 and x.shape[0] == mask.numel():
                x = x[mask.reshape(-1).to(device=x.device, dtype=torch.bool)]  # tokens flattened (e.g. MoE)
            x = x.reshape(-1, n_in).float()
            g = (x.T @ x).cpu()
            grams[name] = g if name not in grams else grams[name] + g
        return record

    handles = []
    try:
        for name, (module, conv1d) in modules.items():
            n_in = module.weight.shape[0] if conv1d else module.weight.shape[1]
            handles.append(module.register_forward_hook(hook(f"{name}.weight" if name else "weight", n_in)))
        seen = 0
        with torch.no_grad():
            for batch in batches:
                mask_now[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
                _forward(model, batch)
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise SpliceError("no calibration batches: the Gram matrices need at least one")
    return grams


def _rows(batch: Batch) -> list[Batch]:
    """The examples of a batch, each as a batch of one (every tensor sliced on its first dimension)."""
    if isinstance(batch, dict):
        sizes = {v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0}
        if len(sizes) != 1:
            raise SpliceError(f"cannot split a batch into examples: its tensors have first dimensions {sorted(sizes)}")
        n = sizes.pop()
        return [{k: v[i:i + 1] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in batch.items()}
                for i in range(n)]
    if isinstance(batch, (tuple, list)):
        n = batch[0].shape[0]
        return [type(batch)(v[i:i + 1] for v in batch) for i in range(n)]
    return [batch[i:i + 1] for i in range(batch.shape[0])]


def _model_loss(model: nn.Module, batch: Batch) -> Tensor:
    out = _forward(model, batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None:
        raise SpliceError("the model returned no loss for a calibration batch (batches need labels, or pass "
                          "loss_fn(model, batch) -> loss)")
    return loss


def compute_fisher(model: nn.Module, batches: Iterable[Batch],
                   loss_fn: Callable[[nn.Module, Batch], Tensor] | None = None, *,
                   per_example: bool = False) -> dict[str, Tensor]:
    """The empirical diagonal Fisher of every trainable parameter: the mean of (∂ loss / ∂ θ)² over units.

    Args:
        model: the model; its train/eval mode is left as it is (use eval mode for deterministic dropout), and so
            are its ``.grad`` fields (gradients come from `torch.autograd.grad`).
        batches: what `loss_fn` takes.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: ``model(**batch).loss`` (an HF model given labels).
        per_example: one unit per example (the Fisher of the paper: each example's squared gradient, averaged),
            instead of one per batch (the squared gradient of the batch's mean loss: cheaper, and smaller).

    Returns:
        float32 tensors on the CPU, keyed by parameter name, shaped like the parameters; a parameter that no loss
        depends on gets zeros.

    Raises:
        SpliceError: no batches, or a loss that is not a scalar.
    """
    loss_fn = loss_fn or _model_loss
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sums = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params}
    units = 0
    with torch.enable_grad():
        for batch in batches:
            for unit in (_rows(batch) if per_example else [batch]):
                loss = loss_fn(model, unit)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    shape = f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""
                    raise SpliceError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}{shape}")
                grads = torch.autograd.grad(loss.reshape(()), [p for _, p in params], allow_unused=True)
                for (n, _), grad in zip(params, grads):
                    if grad is not None:
                        sums[n] += grad.detach().float().pow(2).cpu()
                units += 1
    if units == 0:
        raise SpliceError("no calibration batches: the Fisher needs at least one")
    return {n: s / units for n, s in sums.items()}


# ----------------------------------------------------------------------------------------------- container
class _LazyTensors(Mapping[str, Tensor]):
    """The tensors of one safetensors file, read one at a time on access (nothing held in memory)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        with safe_open(str(path), framework="pt") as f:
            self._keys = list(f.keys())
        self._set = set(self._keys)

    def __getitem__(self, name: str) -> Tensor:
        from safetensors import safe_open

        if name not in self._set:
            raise KeyError(name)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as exc:  # the file changed or was truncated since it was opened
            raise SpliceError(f"{self.path}: cannot read calibration tensor {name!r} ({exc})") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._set


def _tensor_file(kind: str, index: int) -> str:
    return f"{kind}-{index:05d}.safetensors"


def _save_tensors(tensors: Mapping[str, Tensor], path: Path, kind: str, index: int) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path),
              metadata={"kind": kind, "model_index": str(index)})


def _write_index(folder: Path, files: dict[str, list[str]], num_models: int, meta: dict[str, Any]) -> None:
    index = {"format": FORMAT, "version": 1, "num_models": num_models, "files": files, "meta": meta}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, default=str) + "\n", encoding="utf-8")


@dataclass
class Calibration:
    """Per-model calibration tensors by kind: ``data[kind][model_index][tensor_name]``, plus free-form `meta`."""

    data: dict[str, list[Mapping[str, Tensor]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        return sorted(self.data)

    @property
    def num_models(self) -> int:
        return max((len(v) for v in self.data.values()), default=0)

    def add(self, kind: str, per_model: Sequence[Mapping[str, Tensor]]) -> None:
        """Set the tensors of `kind`, one mapping per model (in the merge's model order)."""
        if kind not in KINDS:
            raise SpliceError(f"unknown calibration kind {kind!r}{closest(kind, KINDS)}; known: {', '.join(KINDS)}")
        others = [k for k in self.data if k != kind]
        if others and len(per_model) != self.num_models:
            raise SpliceError(f"calibration kind {kind!r} has {len(per_model)} models, the others "
                              f"{self.num_models}")
        self.data[kind] = list(per_model)

    def get(self, kind: str, model_index: int, tensor_name: str) -> Tensor | None:
        """The `kind` tensor of model `model_index` for weight `tensor_name`, or None when it has none.

        A name missing as such is also looked up by suffix, so "h.0.attn.c_attn.weight" (as a checkpoint file
        stores it) finds "transformer.h.0.attn.c_attn.weight" (as the loaded model names it), and back, when
        exactly one name matches.

        Raises:
            SpliceError: the calibration has no `kind`, or no model `model_index`.
        """
        if kind not in self.data:
            have = ", ".join(self.kinds) or "none"
            raise SpliceError(f"the calibration has no {kind!r} statistics (it has: {have}); run calibration "
                              f"with kind={kind!r}")
        models = self.data[kind]
        if not 0 <= model_index < len(models):
            raise SpliceError(f"the calibration has {kind!r} statistics for {len(models)} models, not for model "
                              f"index {model_index}")
        tensors = models[model_index]
        key = _lookup(tensors, tensor_name)
        return None if key is None else tensors[key]

    def names(self, kind: str, model_index: int) -> list[str]:
        """The tensor names model `model_index` has `kind` statistics for."""
        self.get(kind, model_index, "")  # validates kind and index
        return list(self.data[kind][model_index])

    def close(self) -> None:
        """Drop the tensors (and the lazy files' key lists); the object is empty afterwards."""
        self.data = {}

    def save(self, directory: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write ``calibration.json`` and one ``<kind>-<model>.safetensors`` per kind and model, atomically.

        Raises:
            SpliceError: `directory` exists and `force` is False.
        """
        from splice.io.checkpoints import atomic_output_dir

        out = Path(directory)
        with atomic_output_dir(out, force=force) as tmp:
            files: dict[str, list[str]] = {}
            for kind in self.kinds:
                files[kind] = []
                for i, tensors in enumerate(self.data[kind]):
                    _save_tensors(tensors, tmp / _tensor_file(kind, i), kind, i)
                    files[kind].append(_tensor_file(kind, i))
            _write_index(tmp, files, self.num_models, self.meta)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, lazy: bool = True) -> Calibration:
        """Open a folder written by `save`; with `lazy` (default), each tensor is read only when asked for.

        Raises:
            SpliceError: a missing or malformed ``calibration.json``, or a missing or unreadable tensor file.
        """
        from safetensors.torch import load_file

        from splice.io.checkpoints import read_json

        folder = Path(directory)
        if not folder.is_dir():
            raise SpliceError(f"{folder}: calibration folder does not exist")
        index = read_json(folder / INDEX_FILE)
        if index.get("format") != FORMAT or not isinstance(index.get("files"), dict):
            raise SpliceError(f"{folder / INDEX_FILE}: not a splice calibration index (format "
                              f"{index.get('format')!r}, expected {FORMAT!r})")
        cal = cls(meta=dict(index.get("meta") or {}))
        for kind, names in index["files"].items():
            if kind not in KINDS or not isinstance(names, list):
                raise SpliceError(f"{folder / INDEX_FILE}: unknown calibration kind {kind!r}")
            per_model: list[Mapping[str, Tensor]] = []
            for name in names:
                path = folder / str(name)
                if Path(str(name)).name != str(name) or not path.is_file():
                    raise SpliceError(f"{path}: calibration tensor file is missing")
                try:
                    per_model.append(_LazyTensors(path) if lazy else load_file(str(path)))
                except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
                    raise SpliceError(f"{path}: cannot read calibration tensors ({exc})") from exc
            cal.data[kind] = per_model
        return cal


def _lookup(tensors: Mapping[str, Tensor], name: str) -> str | None:
    """`name` itself, or the one key that ends with ".name" (or that `name` ends with ".key"), else None."""
    if name in tensors:
        return name
    matches = [k for k in tensors if k.endswith("." + name) or name.endswith("." + k)]
    return matches[0] if len(matches) == 1 else None


# ----------------------------------------------------------------------------------------------- models and data
def read_texts(source: str | os.PathLike[str] | Sequence[str], text_field: str = "text") -> list[tuple[str, str]]:
    """Calibration examples as (prompt, completion) pairs ("" prompt for plain text).

    Args:
        source: a list of strings; a ``.txt`` file (one example per non-empty line); or a CSV/TSV/JSONL file read
            by `splice.train.data.load_lm_file` (a `text_field` field, or ``prompt`` + ``completion``).

    Raises:
        SpliceError: a missing or unreadable file, or no examples.
    """
    from splice.train.data import load_lm_file

    if not isinstance(source, (str, os.PathLike)):
        texts = [str(t) for t in source if str(t).strip()]
        if not texts:
            raise SpliceError("calibration texts are empty")
        return [("", t) for t in texts]
    path = Path(source).expanduser()
    if path.suffix.lower() != ".txt":
        return load_lm_file(path, text_field=text_field)
    if not path.is_file():
        raise SpliceError(f"{path}: calibration file does not exist")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SpliceError(f"{path}: cannot read calibration texts ({exc})") from exc
    pairs = [("", ln) for ln in lines if ln]
    if not pairs:
        raise SpliceError(f"{path}: file is empty (no calibration texts)")
    return pairs


def architecture(config: Mapping[str, Any]) -> str:
    """"causal-lm", "sequence-classification" or "encoder", from a config.json's ``architectures``."""
    archs = [str(a) for a in (config.get("architectures") or [])]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence-classification"
    return "encoder"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _load_model(folder: str, arch: str, dtype: torch.dtype, where: str) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from splice.io.models import _dtype_kwargs, _from_pretrained

    auto = {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification,
            "encoder": AutoModel}[arch]
    try:
        model = _from_pretrained(auto, folder, **_dtype_kwargs(dtype))
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... all mean "cannot load"
        raise SpliceError(f"{where}: cannot load it as a {arch} model for calibration ({_one_line(exc)})") from exc
    return model.eval()


def _load_tokenizer(folders: Sequence[str], model: nn.Module) -> Any:
    from transformers import AutoTokenizer

    from splice.io.models import _from_pretrained

    errors = []
    for folder in dict.fromkeys(folders):
        try:
            tokenizer = _from_pretrained(AutoTokenizer, folder)
            break
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for "no usable tokenizer"
            errors.append(f"{folder}: {_one_line(exc)}")
    else:
        raise SpliceError(f"calibration needs a tokenizer and none loads ({'; '.join(errors)}); set "
                          f"tokenizer_source to a model that has one")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


class _TextCollator:
    """(prompt, completion) pairs → input_ids, attention_mask of the joined texts (no labels)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if tokenizer.pad_token_id is None:
            raise SpliceError("the tokenizer has no pad token (set tokenizer.pad_token, e.g. to its eos token)")
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch: Sequence[tuple[str, str]]) -> dict[str, Tensor]:
        texts = [f"{p} {c}".strip() if p else c for p, c in batch]
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def sampled_label_loss(seed: int) -> Callable[[nn.Module, Batch], Tensor]:
    """Cross-entropy against labels drawn from the model's own prediction: the Fisher of the paper (an
    expectation over the model's p(y|x)), for classifiers calibrated on unlabelled texts. The model returns logits,
    as a tensor or as an output with ``.logits``; one generator serves every call, so draws follow call order."""
    gen = torch.Generator().manual_seed(seed)

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        out = _forward(model, batch)
        logits = out if isinstance(out, Tensor) else out.logits
        y = torch.multinomial(torch.softmax(logits.detach().float().cpu(), -1), 1, generator=gen).squeeze(-1)
        return nn.functional.cross_entropy(logits.float(), y.to(logits.device))
    return loss


def _kinds(kinds: str | Iterable[str]) -> list[str]:
    out = [kinds] if isinstance(kinds, str) else sorted(set(kinds))
    for k in out:
        if k not in KINDS:
            raise SpliceError(f"unknown calibration kind {k!r}{closest(k, KINDS)}; known: {', '.join(KINDS)}")
    if not out:
        raise SpliceError(f"no calibration kind asked for (known: {', '.join(KINDS)})")
    return out


def calibrate_model(model: nn.Module, tokenizer: Any, items: Sequence[Any], kinds: str | Sequence[str], *,
                    arch: str = "causal-lm", labelled: bool = False, batch_size: int = 8,
                    max_batches: int | None = None, max_length: int = 256,
                    loss_fn: Callable[[nn.Module, Batch], Tensor] | None = None, per_example: bool = False,
                    seed: int = 0, where: str = "model") -> dict[str, dict[str, Tensor]]:
    """The `kinds` statistics of one loaded transformers model over calibration examples.

    Args:
        items: (prompt, completion) pairs (see `read_texts`), or (text, label) pairs when `labelled`.
        arch: "causal-lm" (next-token loss on the completions), "sequence-classification" (its own loss on
            labelled items, else labels drawn from its prediction), or "encoder" (Grams; Fisher only with loss_fn).
        max_batches: use only the first batches (None: all).
        seed: the seed of drawn labels.

    Returns:
        kind → {tensor name (as the model names it): tensor}.
    """
    from splice.train.data import CausalLMCollator, ClassificationCollator, batches

    kinds = _kinds(kinds)
    if arch == "causal-lm":
        collate: Callable[[Any], dict[str, Tensor]] = CausalLMCollator(tokenizer, max_length)
    elif labelled:
        collate = ClassificationCollator(tokenizer, max_length)
    else:
        collate = _TextCollator(tokenizer, max_length)
    chosen = [collate(b) for i, b in enumerate(batches(list(items), batch_size))
              if max_batches is None or i < max_batches]
    out: dict[str, dict[str, Tensor]] = {}
    if "gram" in kinds:
        out["gram"] = compute_gram(model, chosen)
    if "fisher" in kinds:
        if loss_fn is None and arch == "encoder":
            raise SpliceError(f"{where}: a model without a task head has no loss for the Fisher; pass loss_fn or "
                              f"calibrate only 'gram'")
        if loss_fn is None and arch == "sequence-classification" and not labelled:
            loss_fn = sampled_label_loss(seed)
        out["fisher"] = compute_fisher(model, chosen, loss_fn, per_example=per_example)
    return out


def calibrate(
    models: Sequence[str | os.PathLike[str]],
    data: str | os.PathLike[str] | Sequence[str],
    kinds: str | Sequence[str],
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    max_length: int = 256,
    loss_fn: Callable[[nn.Module, Batch], Tensor] | None = None,
    per_example: bool = False,
    text_field: str = "text",
    label_field: str = "label",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] | None = None,
) -> Calibration:
    """Load each model, run the same batches of `data` through it, and collect `kinds` statistics.

    The model class follows its config's ``architectures``: a causal LM (…ForCausalLM / …LMHeadModel) reads
    (prompt, completion) or text rows and its Fisher is that of the completion-token loss; a sequence classifier
    reads (text, label) rows (`splice.train.data.load_classification_file`; from a .txt file or a list of texts,
    labels drawn from its prediction) and uses its own loss; any other model (an encoder) reads texts and gets
    ``gram``, and ``fisher`` only with a `loss_fn`.

    Args:
        models: model folders or hub ids (each with its tokenizer), in the merge's model order.
        data: CSV/TSV/JSONL (``text``, or ``prompt`` + ``completion``; ``text`` + ``label`` for classifiers), a
            .txt file with one text per line, or a list of texts.
        kinds: "fisher", "gram", or both.
        batch_size, max_batches, max_length: how much data (max_batches None: all of it).
        loss_fn: ``loss_fn(model, batch) -> loss`` for the Fisher, overriding the model's own loss.
        per_example: Fisher from per-example gradients (see `compute_fisher`).
        text_field, label_field: column names in `data`.
        seed: the seed of labels drawn for an unlabelled classifier.
        dtype: the dtype the models are loaded in.
        log: called with one line per model.

    Raises:
        SpliceError: unknown kind, no models, a model or data file that cannot be read, or a Fisher with no loss.
    """
    from splice.io.models import resolve_model
    from splice.train.data import load_classification_file

    kinds = _kinds(kinds)
    if not models:
        raise SpliceError("calibrate needs at least one model")
    if max_batches is not None and max_batches < 1:
        raise SpliceError(f"max_batches must be at least 1, got {max_batches}")
    per_kind: dict[str, list[dict[str, Tensor]]] = {k: [] for k in kinds}
    archs = []
    for path in models:
        where = resolve_model(str(path))
        arch = architecture(_config_of(where))
        labelled = (arch == "sequence-classification" and isinstance(data, (str, os.PathLike))
                    and Path(data).suffix.lower() != ".txt")
        if labelled:
            items: list = list(load_classification_file(data, text_field, label_field))  # type: ignore[arg-type]
        else:
            items = read_texts(data, text_field)
        model = _load_model(where, arch, dtype, f"model {path}")
        tokenizer = _load_tokenizer([where], model)
        stats = calibrate_model(model, tokenizer, items, kinds, arch=arch, labelled=labelled,
                                batch_size=batch_size, max_batches=max_batches, max_length=max_length,
                                loss_fn=loss_fn, per_example=per_example, seed=seed, where=f"model {path}")
        for k in kinds:
            per_kind[k].append(stats[k])
        archs.append(arch)
        if log is not None:
            log(f"calibrated {path} ({arch}): {', '.join(kinds)}")
        del model, stats
    cal = Calibration(meta={"models": [str(p) for p in models],
                            "data": str(data) if isinstance(data, (str, os.PathLike)) else "texts",
                            "architectures": archs, "batch_size": batch_size, "max_batches": max_batches,
                            "max_length": max_length, "per_example": per_example})
    for k in kinds:
        cal.add(k, per_kind[k])
    return cal


def _config_of(where: str) -> dict[str, Any]:
    from transformers import AutoConfig

    from splice.io.models import _from_pretrained

    try:
        return _from_pretrained(AutoConfig, where).to_dict()
    except Exception as exc:
        raise SpliceError(f"cannot read the config of model {where}: {_one_line(exc)}") from exc


# ----------------------------------------------------------------------------------------------- merge extras
def plan_models(plan: Any) -> list[Any]:
    """The inputs a plan's method merges (its `tensors`), in order of first appearance."""
    models: list[Any] = []
    for task in plan.tasks:
        for s in task.inputs:
            if not any(s.input is m for m in models):
                models.append(s.input)
    return models


class PlanExtras:
    """A merge plan's view of a `Calibration`: per output tensor, ``{kind: [tensor per method input]}``.

    Args:
        calibration: statistics of the plan's method inputs, in order of first appearance (`plan_models`).
        models: those inputs.
        needs: the kinds the method needs.
        folder: a temporary folder holding the statistics, deleted by `close`.
    """

    def __init__(self, calibration: Calibration, models: list[Any], needs: Iterable[str],
                 folder: Path | None = None, conv1d: Iterable[str] = ()) -> None:
        self.calibration, self.needs, self.folder = calibration, sorted(set(needs)), folder
        self.index = {id(m): i for i, m in enumerate(models)}
        # Weights stored (in, out) (GPT-2's Conv1D): a square one's layout cannot be told from its shape.
        self.conv1d = set(conv1d)

    @classmethod
    def build(cls, plan: Any, source: str | os.PathLike[str] | Sequence[str] | Calibration, *,
              progress: bool = True, batch_size: int = 8, max_batches: int | None = None,
              max_length: int = 256, per_example: bool = False, seed: int = 0) -> PlanExtras:
        """A saved calibration folder or a `Calibration` as it is, or one computed for the plan's inputs from
        texts (a .txt / CSV / TSV / JSONL file, or a list of strings).

        Raises:
            SpliceError: a saved calibration for another number of models or without a needed kind; no texts; an
                input that cannot be loaded as a transformers model.
        """
        models = plan_models(plan)
        needs = _kinds(plan.method.needs)
        folder = None
        if isinstance(source, Calibration):
            cal = source
        elif isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
            cal = Calibration.load(source)
        else:
            cal, folder = _calibrate_plan(plan, models, source, needs, progress=progress, batch_size=batch_size,
                                          max_batches=max_batches, max_length=max_length,
                                          per_example=per_example, seed=seed)
        missing = [k for k in needs if k not in cal.kinds]
        if missing or cal.num_models != len(models):
            name = source if isinstance(source, (str, os.PathLike)) else "(given)"
            raise SpliceError(f"calibration {name}: holds {', '.join(cal.kinds) or 'nothing'} for "
                              f"{cal.num_models} models; merge_method {plan.method.name!r} needs "
                              f"{', '.join(needs)} for {len(models)} models")
        from splice.io.models import module_kinds

        kinds = module_kinds(plan.donor.folder) if getattr(plan, "donor", None) is not None else {}
        return cls(cal, models, needs, folder, conv1d=[f"{n}.weight" for n, k in kinds.items() if k == "conv1d"])

    compute = build  # the earlier name

    def for_task(self, task: Any) -> dict[str, list[Tensor]]:
        """``{kind: [statistic of each of task.inputs]}`` for every needed kind that every input has."""
        out = {}
        for kind in self.needs:
            found = [self.calibration.get(kind, self.index[id(s.input)], s.name) for s in task.inputs]
            if all(t is not None for t in found):
                out[kind] = found
        if "gram" in out and task.name in self.conv1d:
            out["layout"] = ["in_out"]  # read by regmean over its `layout` parameter
        return out

    def close(self) -> None:
        import shutil

        self.calibration.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


Extras = PlanExtras


def _calibrate_plan(plan: Any, models: list[Any], source: Any, kinds: list[str], *, progress: bool,
                    batch_size: int, max_batches: int | None, max_length: int, per_example: bool,
                    seed: int) -> tuple[Calibration, Path]:
    """Statistics of every input of `plan`, written model by model to a temporary folder and opened lazily."""
    import shutil
    import sys
    import tempfile

    pairs = read_texts(source)
    folder = Path(tempfile.mkdtemp(prefix="splice-calibration-"))
    try:
        files: dict[str, list[str]] = {k: [] for k in kinds}
        for i, inp in enumerate(models):
            if progress:
                print(f"calibrating {inp.where}: {', '.join(kinds)} over {len(pairs)} examples", file=sys.stderr,
                      flush=True)
            model, tokenizer, arch = _load_input(inp, [str(plan.tokenizer_from)])
            stats = calibrate_model(model, tokenizer, pairs, kinds, arch=arch, batch_size=batch_size,
                                    max_batches=max_batches, max_length=max_length, per_example=per_example,
                                    seed=seed, where=inp.where)
            del model
            for k in kinds:
                _save_tensors(stats[k], folder / _tensor_file(k, i), k, i)
                files[k].append(_tensor_file(k, i))
            del stats
        _write_index(folder, files, len(models), {"data": str(source) if isinstance(source, (str, os.PathLike))
                                                  else "texts", "models": [m.where for m in models]})
        return Calibration.load(folder, lazy=True), folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _load_input(inp: Any, tokenizer_folders: list[str]) -> tuple[nn.Module, Any, str]:
    """A merge input as a transformers model: a model folder as it is, a LoRA input as its base plus its update."""
    base = getattr(inp, "base", None)
    deltas = getattr(inp, "deltas", None)
    folder = str(base.folder if base is not None else inp.folder)
    arch = architecture(inp.config)
    model = _load_model(folder, arch, torch.float32, inp.where)
    if deltas is not None:  # an adapter: add its update to the loaded base weights (never to the input's tensors)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in deltas:
                key = _lookup(params, name)
                if key is None:
                    raise SpliceError(f"{inp.where}: the loaded model has no parameter for tensor {name!r}")
                deltas[name].apply_to(params[key].data)
    tokenizer = _load_tokenizer([folder, *tokenizer_folders], model)
    return model, tokenizer, arch
