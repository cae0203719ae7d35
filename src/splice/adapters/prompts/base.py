"""What every prompt method shares: its config fields, the model's dimensions, and the one place the prompt enters.

Prompt methods add no weight delta: they learn *virtual tokens*. Prompt tuning and P-tuning put n learned
embeddings in front of the input embeddings; prefix tuning puts n learned keys and values in front of every
attention layer's own (as a pre-filled KV cache). Either way the model must see a longer sequence, a longer
attention mask and (for the embedding methods) longer labels, and only the caller of the model's forward holds
those. So a model with prompt adapters carries one `PromptAdapters` submodule (`model.splice_prompts`, holding
the adapters' parameters, so `.to()`, `.parameters()` and optimizers see them) and one forward pre-hook on the
model that rewrites the keyword arguments for the active prompt adapter; the model's own forward is untouched,
and an HF model stays an HF model. The arguments are rewritten exactly as PEFT's `PeftModelFor*` wrappers do, so
that the same weights give the same outputs (tests/adapters/test_prompt_peft_parity.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from splice.adapters.config import doc
from splice.errors import SpliceError

ATTR = "splice_prompts"
IGNORE_INDEX = -100  # the label value cross-entropy skips: virtual tokens predict nothing


@dataclass
class PromptConfig:
    """Fields every prompt method has; the model's dimensions are read from the model when the adapter is added."""

    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    kind: ClassVar[str] = "embeds"  # "embeds": virtual input embeddings; "prefix": virtual keys and values

    num_virtual_tokens: int = doc("Number of virtual tokens the adapter learns.", default=20)

    def __post_init__(self) -> None:
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int) \
                or self.num_virtual_tokens < 1:
            raise SpliceError(f"num_virtual_tokens: must be a positive integer, got {self.num_virtual_tokens!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def peft_fields(self, dims: "PromptDims") -> dict[str, Any]:
        """The method's own fields of PEFT's adapter_config.json (the shared ones are written by persist.py)."""
        return {}


@dataclass(frozen=True)
class PromptDims:
    """The model dimensions a prompt adapter is shaped by, named as PEFT's config names them."""

    token_dim: int  # embedding width; for prefix tuning, the key/value width of one layer (heads × head_dim)
    num_layers: int
    num_attention_heads: int  # for prefix tuning, the key/value heads

    @property
    def head_dim(self) -> int:
        return self.token_dim // self.num_attention_heads


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise SpliceError(f"prompt methods need a transformers model with a config; {type(model).__name__} has none")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_dims(model: nn.Module, kind: str) -> PromptDims:
    """Dimensions of `model` as PEFT derives them (`_prepare_prompt_learning_config`), for a method of `kind`."""
    config = _text_config(model)
    layers = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    heads = getattr(config, "num_attention_heads", None)
    if not (layers and width and heads):
        raise SpliceError(f"{type(model).__name__}: its config lacks num_hidden_layers, hidden_size or "
                          "num_attention_heads, which prompt methods need")
    if kind == "prefix" and getattr(config, "num_key_value_heads", None):
        # Grouped-query attention caches fewer heads than it attends with: the prefix is shaped like the cache.
        head_dim = getattr(config, "head_dim", None) or width // heads
        heads = config.num_key_value_heads
        width = head_dim * heads
    return PromptDims(int(width), int(layers), int(heads))


class PromptAdapters(nn.Module):
    """The prompt adapters of one model and which one is active; `hook` feeds the active one to the model."""

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict()  # adapter name → module with `virtual_tokens()` (n, width)
        self.kinds: dict[str, str] = {}
        self.dims: dict[str, PromptDims] = {}
        self.active: str | None = None
        self.disabled = False
        self.handle: Any = None
        self.cache_argument: str | None = None  # "cache" or "past_key_values", by the model's forward

    def virtual_tokens(self, name: str) -> Tensor:
        return self.encoders[name].virtual_tokens()

    def hook(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Forward pre-hook (with kwargs) of the adapted model: prepend the active adapter's virtual tokens."""
        if self.disabled or self.active is None:
            return None
        name = self.active
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise SpliceError(f"prompt adapter {name!r}: pass the model's inputs by keyword "
                                  "(input_ids=..., attention_mask=...)")
            kwargs = {"input_ids": args[0], **kwargs}
        kwargs = dict(kwargs)
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            raise SpliceError(f"prompt adapter {name!r}: the model was given a KV cache (as generate does); "
                              "incremental decoding with prompt adapters is not supported yet")
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            raise SpliceError(f"prompt adapter {name!r}: the model was called without input_ids or inputs_embeds")
        rows = (ids if ids is not None else embeds).shape[0]
        n = self.encoders[name].num_virtual_tokens
        tokens = self.virtual_tokens(name)  # (n, width)
        mask = kwargs.get("attention_mask")
        if mask is not None:  # the virtual tokens are always attended to
            kwargs["attention_mask"] = torch.cat([mask.new_ones(rows, n), mask], 1)
        if self.kinds[name] == "prefix":
            kwargs[self.cache_argument] = prefix_cache(tokens, rows, self.dims[name], _dtype(model))
            if kwargs.get("position_ids") is not None:  # the real tokens come after the n cached ones
                kwargs["position_ids"] = kwargs["position_ids"] + n
            return (), kwargs
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = torch.cat([tokens.to(embeds.dtype).unsqueeze(0).expand(rows, -1, -1), embeds], 1)
        labels = kwargs.get("labels")
        # Token labels of this very sequence only: a classifier's (rows,) labels and an encoder-decoder's decoder
        # labels do not run over the input tokens, and the virtual ones add nothing to them.
        if labels is not None and labels.dim() == 2 and labels.shape[1] == embeds.shape[1] and \
                not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            kwargs["labels"] = torch.cat([labels.new_full((rows, n), IGNORE_INDEX), labels], 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = torch.cat([kwargs["token_type_ids"].new_zeros(rows, n),
                                                  kwargs["token_type_ids"]], 1)
        # Positions would have to cover the virtual tokens too; PEFT drops them and lets the model count.
        kwargs["position_ids"] = None
        return (), kwargs


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def prefix_cache(tokens: Tensor, rows: int, dims: PromptDims, dtype: torch.dtype) -> Any:
    """The prefix (n, layers·2·token_dim) as a KV cache: per layer keys and values (rows, heads, n, head_dim)."""
    from transformers import DynamicCache

    n = tokens.shape[0]
    kv = tokens.to(dtype).unsqueeze(0).expand(rows, -1, -1)
    kv = kv.reshape(rows, n, dims.num_layers * 2, dims.num_attention_heads, dims.head_dim)
    kv = kv.permute(2, 0, 3, 1, 4)  # (layers·2, rows, heads, n, head_dim): PEFT's layout, layer-major
    return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(dims.num_layers)])


def container(model: nn.Module, create: bool = False) -> PromptAdapters | None:
    """The model's PromptAdapters (made and hooked on first use when `create`)."""
    box = model._modules.get(ATTR)
    if box is None and create:
        box = PromptAdapters()
        model.add_module(ATTR, box)
        box.handle = model.register_forward_pre_hook(box.hook, with_kwargs=True)
    return box


def remove_container(model: nn.Module) -> None:
    box = container(model)
    if box is not None:
        box.handle.remove()
        del model._modules[ATTR]


class PromptTable(nn.Module):
    """Virtual tokens as a plain table (n, width): what a saved prompt adapter holds, whatever produced it."""

    def __init__(self, num_virtual_tokens: int, width: int):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, width)

    def virtual_tokens(self) -> Tensor:
        return self.embedding.weight
