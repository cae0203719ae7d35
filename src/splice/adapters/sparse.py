"""What the sparse fine-tuning methods share: trained values on a set of entries of the base weight (SHiRA, SaRA,
SpIEL) and a trained block of whole input columns or output rows (PaCA, S2FT).

    entries:  ΔW.flatten()[index] = values                    (a `Sparse` delta)
    columns:  ΔW[:, idx] = s · D    D: out×n                   y = W₀x + b + s · D x[idx]
    rows:     ΔW[idx, :] = s · E    E: n×in                    y = W₀x + b,  y[idx] += s · E x

Entries are addressed by their flat position in the weight *as stored* (HF Conv1D stores W transposed, (in, out)),
so the same positions serve the forward pass, the `Sparse` delta and the saved folder with no transposition. Rows
and columns are those of the (out, in) matrix W the layer computes with, whatever the storage.

A column block needs only the selected columns x[idx] of the input for its gradient (PaCA's point: the activations
kept for backward are n/in of LoRA's); an entry set builds W₀ + ΔW densely for one matmul, whose dense gradient
autograd computes anyway and gathers at the entries (SpIEL reads it there to regrow its index set).
"""
from __future__ import annotations

import copy
import math
import zlib
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.lora import lora_update, module_dims
from splice.delta.forms import Delta, Sparse
from splice.errors import SpliceError

KINDS = ("linear", "conv1d")


def check_kind(method: str, base: nn.Module, kind: str) -> None:
    if kind not in KINDS:
        raise SpliceError(f"{method} cannot wrap {type(base).__name__}; it wraps nn.Linear and HF Conv1D")


def value_dtype(weight: Tensor) -> torch.dtype:
    return weight.dtype if weight.is_floating_point() else torch.float32


def count_of(fraction: float, total: int) -> int:
    """⌈fraction · total⌉ and at least 1, robust to float rounding (0.1 · 1000 is 100 entries, not 101)."""
    return max(1, math.ceil(fraction * total - 1e-9))


def check_fraction(name: str, value: Any) -> None:
    """A fraction in (0, 1], or a one-line SpliceError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise SpliceError(f"{name}: must be a fraction in (0, 1], got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpliceError(f"{name}: must be a positive integer, got {value!r}")


def check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpliceError(f"{name}: must be an integer, got {value!r}")


def module_seed(seed: int, name: str) -> int:
    """A module's own seed: `seed` mixed with its name, so that same-shaped modules draw independently and the same
    model draws the same again (zlib.crc32, not `hash`, which changes between processes)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63


class SeedPerModule:
    """Config mixin (needs a `seed` field): the config each module is built with carries `module_seed`."""

    def for_target(self, name: str) -> Any:
        config = copy.copy(self)
        config.module_seed = module_seed(self.seed, name)  # not a field: per module, never saved
        return config


def seed_of(config: Any) -> int:
    """The seed a module draws with (`seed` itself for a config not prepared per module)."""
    return getattr(config, "module_seed", config.seed)


def random_flat_positions(numel: int, count: int, seed: int | None) -> Tensor:
    """`count` distinct positions among `numel`, sorted: the head of a permutation drawn from a `torch.Generator`
    seeded with `seed` (unseeded: the generator's fixed default seed)."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    return torch.randperm(numel, generator=generator)[:count].sort().values


def index_dtype(numel: int) -> torch.dtype:
    """How saved positions are stored: int32 while they fit (half the bytes of int64)."""
    return torch.int32 if numel < 2 ** 31 else torch.int64


def position_problem(index: Tensor, size: int, key: str) -> str | None:
    """What is wrong with saved positions `index` among `size` (outside [0, size), repeated), or None."""
    index = index.long().flatten()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        return f"{key}: positions outside the {size} the weight has"
    if torch.unique(index).numel() != index.numel():
        return f"{key}: positions repeat"
    return None


def with_entries(weight: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """W + ΔW with ΔW.flatten()[index] = values, a new tensor (differentiable in `values`)."""
    return weight.flatten().index_add(0, index, values.to(weight.dtype)).view_as(weight)


def entries_matrix(shape: torch.Size, index: Tensor, values: Tensor) -> Tensor:
    """The dense ΔW of `shape` with `values` at the flat positions `index` (differentiable in `values`)."""
    dense = torch.zeros(math.prod(shape), dtype=values.dtype, device=values.device)
    return dense.index_add(0, index, values).view(shape)


def layer_forward(kind: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The layer's output with `weight` stored as `kind` stores it (HF Conv1D: y = x W + b, W (in, out))."""
    x = x.to(weight.dtype)
    if kind == "conv1d":
        out = x @ weight
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


class SparseEntries(nn.Module):
    """Trained `values` on the flat positions `index` of one module's weight (as stored). A subclass sets the key
    names its folder uses and how many entries a module gets (`entry_count`), and chooses the positions.

    `grad_sink`, when set, receives the dense gradient of the layer's weight on every backward (SpIEL's regrowth).
    """

    values_key: ClassVar[str]
    index_key: ClassVar[str]

    @classmethod
    def entry_count(cls, base: nn.Module, kind: str, config: Any) -> int:
        raise NotImplementedError

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: Any) -> dict[str, tuple[int, ...]]:
        k = cls.entry_count(base, kind, config)
        return {cls.values_key: (k,), cls.index_key: (k,)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        keys = {cls.values_key, cls.index_key}
        return None if keys <= tensors.keys() else f"expected {cls.values_key} and {cls.index_key}"

    @classmethod
    def peft_problem(cls, tensors: dict[str, Tensor], base: nn.Module, kind: str, config: Any) -> str | None:
        return position_problem(tensors[cls.index_key], base.weight.numel(), cls.index_key)

    def __init__(self, base: nn.Module, kind: str, index: Tensor):
        super().__init__()
        self.kind = kind
        weight = base.weight
        self.values = nn.Parameter(torch.zeros(index.numel(), device=weight.device, dtype=value_dtype(weight)))
        self.register_buffer("index", index.long().to(weight.device))
        self.grad_sink: Callable[[Tensor], None] | None = None

    def current_values(self) -> Tensor:
        """The values ΔW holds (SaRA keeps some of them frozen)."""
        return self.values

    def _watched(self, dense: Tensor) -> Tensor:
        if self.grad_sink is not None and dense.requires_grad:
            dense.register_hook(self.grad_sink)  # the gradient of W₀ + ΔW (or of ΔW): the same dense matrix
        return dense

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        # One matmul with W₀ + ΔW (a copy of W₀ with the values scattered in), as PEFT's SHiRA does.
        weight = self._watched(with_entries(base.weight, self.index, self.current_values()))
        return layer_forward(self.kind, x, weight, base.bias)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        update = self._watched(entries_matrix(base.weight.shape, self.index, self.current_values()))
        return layer_forward(self.kind, x, update, None).to(base_out.dtype)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        values = self.current_values().detach().clone()
        return {"weight": Sparse(self.index.clone(), values, base.weight.shape)}

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {self.values_key: self.current_values().detach(),
                self.index_key: self.index.to(index_dtype(base.weight.numel()))}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        """Copy a folder's tensors in (checked by `peft_problem` before the model was touched)."""
        self.index.copy_(state[self.index_key])
        self.values.copy_(state[self.values_key])


def adapters_of(model: nn.Module, adapter_name: str, cls: type, label: str) -> list[tuple[nn.Module, Any]]:
    """(base module, adapter) for every module where adapter `adapter_name` is a `cls` (a training hook's view)."""
    from splice.adapters.inject import adapter_layers

    found = [(layer.base, layer.adapters[adapter_name]) for _, layer in adapter_layers(model)
             if adapter_name in layer.adapters and isinstance(layer.adapters[adapter_name], cls)]
    if not found:
        raise SpliceError(f"adapter {adapter_name!r} has no {label} module")
    return found


def random_units(total: int, count: int, seed: int, width: int = 1) -> Tensor:
    """The sorted indices of `count` random units of `width` consecutive channels among `total` channels (whole
    attention heads when `width` is the head size), from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    units = torch.randperm(total // width, generator=generator)[:count].sort().values
    return (units[:, None] * width + torch.arange(width)).flatten()


class SliceUpdate(nn.Module):
    """A trained block of whole input columns (axis "in") or output rows (axis "out") of one module's (out, in)
    weight, ΔW scaled by `scale`. A subclass sets the key names of its folder."""

    weight_key: ClassVar[str]
    index_key: ClassVar[str]

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        keys = {cls.weight_key, cls.index_key}
        return None if keys <= tensors.keys() else f"expected {cls.weight_key} and {cls.index_key}"

    @classmethod
    def axis_of(cls, base: nn.Module, kind: str, config: Any) -> str:
        """Which side of the weight this module trains: "in" (columns) or "out" (rows)."""
        raise NotImplementedError

    @classmethod
    def peft_problem(cls, tensors: dict[str, Tensor], base: nn.Module, kind: str, config: Any) -> str | None:
        in_f, out_f = module_dims(base, kind)
        size = in_f if cls.axis_of(base, kind, config) == "in" else out_f
        return position_problem(tensors[cls.index_key], size, cls.index_key)

    @staticmethod
    def block_shape(base: nn.Module, kind: str, axis: str, n: int) -> tuple[int, int]:
        in_f, out_f = module_dims(base, kind)
        return (out_f, n) if axis == "in" else (n, in_f)

    def __init__(self, base: nn.Module, kind: str, idx: Tensor, axis: str, scale: float = 1.0):
        super().__init__()
        self.kind, self.axis, self.scale = kind, axis, float(scale)
        weight = base.weight
        shape = self.block_shape(base, kind, axis, idx.numel())
        self.block = nn.Parameter(torch.zeros(shape, device=weight.device, dtype=value_dtype(weight)))
        self.register_buffer("index", idx.long().to(weight.device))

    def _branch(self, x: Tensor) -> Tensor:
        """s · D x[idx] (columns) or s · E x (rows): (…, out) or (…, n)."""
        block = self.block * self.scale if self.scale != 1.0 else self.block
        if self.axis == "in":  # autograd keeps only the n selected input columns for the gradient of D
            return F.linear(x.index_select(-1, self.index).to(block.dtype), block)
        return F.linear(x.to(block.dtype), block)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        out = base(x)
        branch = self._branch(x).to(out.dtype)
        return out + branch if self.axis == "in" else out.index_add(-1, self.index, branch)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        branch = self._branch(x).to(base_out.dtype)
        if self.axis == "in":
            return branch
        return torch.zeros_like(base_out).index_add(-1, self.index, branch)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        return {"weight": slice_delta(self.block.detach(), self.index, self.axis, self.scale, self.kind,
                                      base.weight.shape)}

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {self.weight_key: self.block.detach(), self.index_key: self.index.to(torch.int32)}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        """Copy a folder's tensors in (checked by `peft_problem` before the model was touched)."""
        self.index.copy_(state[self.index_key])
        self.block.copy_(state[self.weight_key])


def slice_delta(block: Tensor, idx: Tensor, axis: str, scale: float, kind: str, shape: torch.Size) -> Delta:
    """The exact ΔW of a row or column block in the cheaper of two stored forms: LowRank with a one-hot selection
    factor (the block plus an n × in or n × out selection), or Sparse (the block's values plus an int64 position
    each), whichever holds fewer bytes."""
    out_f, in_f = (shape[1], shape[0]) if kind == "conv1d" else (shape[0], shape[1])
    n, size = idx.numel(), block.element_size()
    other = in_f if axis == "in" else out_f  # the length of the one-hot selection rows
    if (block.numel() + n * other) * size <= block.numel() * (8 + size):
        select = torch.zeros(n, other, dtype=block.dtype, device=block.device)
        select[torch.arange(n, device=block.device), idx] = 1.0  # (n, in) or (n, out): row j picks idx[j]
        B, A = (block, select) if axis == "in" else (select.t(), block)
        return lora_update(B, A, scale, kind, shape)
    if axis == "in":  # math positions (row o, column idx[j]) of ΔW (out, in), in the block's (out, n) order
        rows, cols = torch.arange(out_f, device=idx.device)[:, None], idx[None, :]
    else:  # (row idx[j], column i), in the block's (n, in) order
        rows, cols = idx[:, None], torch.arange(in_f, device=idx.device)[None, :]
    flat = cols * out_f + rows if kind == "conv1d" else rows * in_f + cols  # Conv1D stores ΔWᵀ
    return Sparse(flat.flatten(), (block * scale).flatten(), shape)
