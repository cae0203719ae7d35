"""The wrapper every adapted module becomes: the original module plus any number of named adapters.

    y = base(x) + Σ_{a ∈ active, not merged} a.contribution(x, base(x))

An adapter (one method, one name, one module) satisfies the `Adapter` protocol below; the wrapper knows nothing
about any method. It only decides which adapters run on which rows:

- one active adapter, nothing merged, no mixed batch → the adapter's fused path (base and adapter in one op);
- several active adapters → their contributions are summed;
- a mixed batch → rows are grouped by adapter and each group's contribution is added to those rows only
  (the S-LoRA / Punica idea: the base runs once for the whole batch);
- disabled → the base alone.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from splice.delta.forms import Delta
from splice.errors import SpliceError


@runtime_checkable
class Adapter(Protocol):
    """What one named adapter on one module provides. Methods implement it as an `nn.Module`.

    Its part of PEFT's folder format is declared on the class: `peft_keys` (the tensor names under a module,
    'lora_A.weight', 'ia3_l', ...), `peft_shapes(base, kind, config)` (what a folder must hold for that module),
    `peft_missing(tensors)` (what an incomplete module lacks) and `load_peft_state(state, base)`; optionally
    `peft_shared_keys` / `peft_shared()` for tensors shared by all modules (VeRA). Optional instance methods:
    `fused_forward(x, base)` (the whole layer in one op), and `merge(base)` / `unmerge(base, token)` where adding
    `delta()` is not how the method merges (IA3 multiplies, DoRA rescales).
    """

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        """The change this adapter makes to `base_out` (same shape) for input `x`."""

    def delta(self, base: nn.Module) -> dict[str, Delta] | None:
        """Parameter name of `base` ('weight', 'bias') → its update, in the cheapest exact form; None for a method
        whose update is not a weight delta (a bottleneck adapter: its config says `has_delta = False`)."""

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        """Tensors under PEFT's key names, relative to the module ('lora_A.weight', ...)."""


class AdapterLayer(nn.Module):
    """Wraps `base` (kept by reference, never copied) and holds its named adapters."""

    def __init__(self, base: nn.Module, kind: str):
        super().__init__()
        self.base = base
        self.kind = kind  # "linear", "conv1d" (HF GPT-2 Conv1D), "embedding", "conv2d", "module"
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        # Set only inside `mixed_batch(...)`: (adapter name, row indices) per group of rows.
        self.row_groups: list[tuple[str, Tensor | slice]] | None = None
        self.row_count = 0  # how many rows `mixed_batch` named: a batch of any other size is refused
        self._merge_cache: dict[str, object] = {}

    def __getattr__(self, name: str):
        # Model code reads attributes of the module it built (`embed_tokens.weight`, `q_proj.in_features`,
        # `padding_idx`); the wrapper answers for the module it wraps so that such code keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "adapters"):
                raise
            return getattr(super().__getattr__("base"), name)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disabled:
            return self.base(x, *args, **kwargs)
        if self.row_groups is not None:
            return self._forward_mixed(x, *args, **kwargs)
        running = [n for n in self.active if n not in self.merged and n in self.adapters]
        if len(running) == 1:
            adapter = self.adapters[running[0]]
            fused = getattr(adapter, "fused_forward", None)
            if fused is not None and not args and not kwargs:
                return fused(x, self.base)
            # A module called with more than its input (a decoder layer's position embeddings): a full copy
            # (modules_to_save) runs the module itself with all of it.
            if fused is not None and getattr(adapter, "takes_module_args", False):
                return fused(x, self.base, *args, **kwargs)
        base_out = self.base(x, *args, **kwargs)
        out = base_out
        for name in running:  # each adapter sees the base output (not the running sum), as the docstring says
            out = out + self.adapters[name].contribution(x, base_out, self.base)
        return out

    def _forward_mixed(self, x: Tensor, *args, **kwargs) -> Tensor:
        # Groups are disjoint, so each group reads its own base rows; updates are in place. A contiguous group (a
        # slice) costs no copy at all. Under autograd an adapter may save the base rows it read (a bottleneck
        # adapter's input is the base output, IA3 multiplies it), so the updates then go into a copy.
        if x.shape[0] != self.row_count:  # extra rows would silently get the base alone, missing ones an IndexError
            raise SpliceError(f"mixed_batch named adapters for {self.row_count} rows, but the batch has {x.shape[0]}")
        base_out = self.base(x, *args, **kwargs)
        out = base_out.clone() if torch.is_grad_enabled() else base_out
        for name, rows in self.row_groups or []:
            if name not in self.adapters or name in self.merged:
                continue
            adapter = self.adapters[name]
            if isinstance(rows, slice):
                add_into = getattr(adapter, "add_into", None)
                if add_into is not None and out is base_out and add_into(x[rows], out[rows]):
                    continue
                out[rows] += adapter.contribution(x[rows], base_out[rows], self.base).to(out.dtype)
            else:
                change = adapter.contribution(x.index_select(0, rows), base_out.index_select(0, rows), self.base)
                out.index_add_(0, rows, change.to(out.dtype))
        return out

    # -- adapters ------------------------------------------------------------------------------------------------
    def add(self, name: str, adapter: nn.Module) -> None:
        if name in self.adapters:
            raise SpliceError(f"adapter {name!r} already exists on this module; delete it first or pick another name")
        adapter.train(self.training)  # a freshly built adapter is in training mode; match the layer (eval → no dropout)
        self.adapters[name] = adapter

    def delete(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    # -- merge ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter `name` into the base weights; `unmerge` restores them (to float rounding)."""
        if name in self.merged or name not in self.adapters:
            return
        adapter = self.adapters[name]
        custom = getattr(adapter, "merge", None)
        if custom is not None:
            self._merge_cache[name] = custom(self.base)
        else:
            deltas = adapter.delta(self.base)
            if deltas is None:  # model.merge_adapter says so first, naming the method; this is the layer's own guard
                raise SpliceError(f"adapter {name!r} ({type(adapter).__name__}) is not a weight delta: it cannot be "
                                  "merged")
            for pname, d in deltas.items():
                d.apply_to(self.base.get_parameter(pname).data)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Take adapter `name` out of the base weights again, whatever order the merges came in."""
        if name not in self.merged:
            return
        # An unmerge is exact only on the weights its merge left (DoRA divides by the column norms it saw, a full
        # copy restores its snapshot): the adapters merged after `name` come out first and go back in after.
        later = self.merged[self.merged.index(name) + 1:]
        for other in reversed(later):
            self._unmerge_last(other)
        self._unmerge_last(name)
        for other in later:
            self.merge(other)

    def _unmerge_last(self, name: str) -> None:
        adapter = self.adapters[name]
        custom = getattr(adapter, "unmerge", None)
        if custom is not None:
            custom(self.base, self._merge_cache.pop(name, None))
        else:
            for pname, d in adapter.delta(self.base).items():
                d.apply_to(self.base.get_parameter(pname).data, scale=-1.0)
        self.merged.remove(name)
