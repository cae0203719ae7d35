"""(IA)³: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022,
https://arxiv.org/abs/2205.05638).

A learned vector l rescales a layer's output, or, for the modules named in `feedforward_modules`, its input:

    y = l ∘ (W₀x + b)          attention-style module: W' = diag(l) W₀, b' = l ∘ b      (l: out)
    y = W₀ (l ∘ x) + b         feed-forward module:    W' = W₀ diag(l)                  (l: in)

l starts at 1, so the adapter starts as the identity. The update is multiplicative: `delta()` returns it as a
`Scale` (the vector and its axis), which needs no dense tensor; merge multiplies the base weight by l and unmerge
divides by it.

Several *active* IA3 adapters on one module add their updates, like every other method here:
y = base + Σ_a (l_a − 1) ∘ base. PEFT multiplies their vectors instead (y = l_a ∘ l_b ∘ base); the two differ by
the second-order term (l_a − 1)(l_b − 1). A single adapter, merged or not, is the same in both.

Unset target_modules and feedforward_modules follow PEFT's (IA)³ table, not LoRA's: the attention keys and values
and the feed-forward output layer, rescaled at its input (BERT: key, value, output.dense; Llama: k_proj, v_proj,
down_proj; `splice.adapters.targets.IA3_TARGETS`). PEFT sets an unset feedforward_modules to that layer even when the
targets do not name it, and then refuses to load its own folder; here it keeps only the targets' own.

Wraps nn.Linear, HF Conv1D and nn.Conv2d (groups = 1) with PEFT's tensor `ia3_l`: (out, 1) or (1, in) for a linear
layer, (1, out|in, 1, 1) for a convolution.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.inject import _matches
from splice.adapters.lora import module_dims
from splice.adapters.registry import register
from splice.adapters.targets import IA3_FEEDFORWARD, IA3_TARGETS
from splice.delta.forms import Delta, Scale
from splice.errors import SpliceError

KINDS = ("linear", "conv1d", "conv2d")


@dataclass
class IA3Config(AdapterConfig):
    """(IA)³ hyper-parameters; field names and meanings follow PEFT's `IA3Config`."""

    feedforward_modules: list[str] | str | None = doc(
        "Modules whose *input* is rescaled (the paper's feed-forward layers), same syntax as target_modules; "
        "the other targets have their output rescaled. Must be among target_modules. None: the architecture's "
        "feed-forward output layer, as PEFT's (BERT: output.dense, Llama: down_proj), kept only where "
        "target_modules names it.", default=None)
    init_ia3_weights: bool = doc("Start the vectors at 1 (the identity); false draws them from N(0, 1).", default=True)

    peft_type: ClassVar[str | None] = "IA3"
    architecture_fields: ClassVar[tuple[str, ...]] = ("target_modules", "feedforward_modules")
    target_table: ClassVar[dict[str, list[str]]] = IA3_TARGETS

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward_modules, (list, tuple)):
            self.feedforward_modules = [str(m) for m in self.feedforward_modules]
            if isinstance(self.target_modules, list):
                extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
                if extra:
                    raise SpliceError(f"feedforward_modules: {extra} are not among target_modules "
                                      f"{self.target_modules}")
        if not isinstance(self.init_ia3_weights, bool):
            raise SpliceError(f"init_ia3_weights: must be true or false, got {self.init_ia3_weights!r}")

    def architecture_defaults(self, model_type: str | None, unset: set[str]) -> dict[str, Any] | None:
        """PEFT's (IA)³ defaults: unset targets are the keys, values and feed-forward output layer
        (`splice.adapters.targets.IA3_TARGETS`); unset feedforward_modules the feed-forward layer among them."""
        out = super().architecture_defaults(model_type, unset)
        if out is None:
            return None
        if "feedforward_modules" in unset:
            feedforward = IA3_FEEDFORWARD.get(model_type or "", [])
            targets = out.get("target_modules", self.target_modules)
            # PEFT sets its whole list whatever the targets are, and then its own check refuses to load the folder
            # it saved when the list is not among them: keep the ones named (any, for a regex or 'all-linear').
            out["feedforward_modules"] = ([f for f in feedforward if f in targets] if isinstance(targets, list)
                                          else list(feedforward))
        return out

    def for_target(self, name: str) -> "IA3Config":
        config = copy.copy(self)
        config.is_feedforward = _matches(name, self.feedforward_modules)  # not a field: per-module, never saved
        return config

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        ff = cfg.get("feedforward_modules")
        return {**super().fields_from_peft(cfg), "feedforward_modules": sorted(ff) if isinstance(ff, (list, set))
                else ff, "init_ia3_weights": bool(cfg.get("init_ia3_weights", True))}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        ff = self.feedforward_modules
        return {**super().to_peft(base=base, kinds=kinds, adapters=adapters),
                # [] and not None: PEFT reads None as "its per-architecture default list".
                "feedforward_modules": [] if ff is None else ff if isinstance(ff, str) else list(ff),
                "fan_in_fan_out": "conv1d" in kinds, "init_ia3_weights": self.init_ia3_weights}


@register("ia3", config=IA3Config, reference="https://arxiv.org/abs/2205.05638")
class IA3Adapter(nn.Module):
    """One (IA)³ vector on one module."""

    peft_keys: ClassVar[tuple[str, ...]] = ("ia3_l",)

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: IA3Config) -> dict[str, tuple[int, ...]]:
        in_f, out_f = module_dims(base, kind)
        ff = getattr(config, "is_feedforward", False)
        if kind == "conv2d":
            return {"ia3_l": (1, in_f if ff else out_f, 1, 1)}
        return {"ia3_l": (1, in_f) if ff else (out_f, 1)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if "ia3_l" in tensors else "expected ia3_l"

    def __init__(self, base: nn.Module, kind: str, config: IA3Config):
        super().__init__()
        if kind not in KINDS:
            raise SpliceError(f"ia3 cannot wrap {type(base).__name__}; it wraps nn.Linear, HF Conv1D and nn.Conv2d")
        if kind == "conv2d" and base.groups != 1:
            raise SpliceError(f"ia3 cannot wrap a grouped Conv2d (groups={base.groups})")
        self.kind = kind
        self.feedforward = getattr(config, "is_feedforward", False)
        shape = self.peft_shapes(base, kind, config)["ia3_l"]
        init = torch.ones if config.init_ia3_weights else torch.randn
        self.ia3_l = nn.Parameter(init(shape, device=base.weight.device, dtype=base.weight.dtype))

    def _vector(self, t: Tensor) -> Tensor:
        """l shaped to broadcast over `t`: the last axis of a linear layer's activations, the channels of a conv."""
        v = self.ia3_l.flatten()
        return v.view(-1, 1, 1) if self.kind == "conv2d" else v

    def _channel_axis(self) -> int:
        return 1 if self.kind == "conv2d" else -1

    # -- forward -------------------------------------------------------------------------------------------------
    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        if self.feedforward:
            return base((x * self._vector(x)).to(x.dtype))
        out = base(x)
        return (out * self._vector(out)).to(out.dtype)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        if not self.feedforward:
            return (base_out * (self._vector(base_out) - 1)).to(base_out.dtype)
        xs = (x * (self._vector(x) - 1)).to(base.weight.dtype)  # the bias is not rescaled: leave it out
        if self.kind == "linear":
            out = F.linear(xs, base.weight)
        elif self.kind == "conv1d":
            out = xs @ base.weight
        else:
            out = F.conv2d(xs, base.weight, None, base.stride, base.padding, base.dilation)
        return out.to(base_out.dtype)

    # -- the delta -----------------------------------------------------------------------------------------------
    def delta(self, base: nn.Module) -> dict[str, Delta]:
        v = self.ia3_l.detach().flatten()
        W = base.weight
        # The axis of W that l scales: out is axis 0 of Linear/Conv2d weights and axis 1 of Conv1D's (in, out).
        out_axis, in_axis = (1, 0) if self.kind == "conv1d" else (0, 1)
        out: dict[str, Delta] = {"weight": Scale(v, in_axis if self.feedforward else out_axis, W.shape)}
        if not self.feedforward and getattr(base, "bias", None) is not None:
            out["bias"] = Scale(v, 0, base.bias.shape)
        return out

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        for pname, d in self.delta(base).items():
            d.apply_to(base.get_parameter(pname).data)

    @torch.no_grad()
    def unmerge(self, base: nn.Module, _: object = None) -> None:
        # Scale.apply_to(scale=-1) is the additive inverse, not the multiplicative one: divide by l instead.
        for pname, d in self.delta(base).items():
            param = base.get_parameter(pname).data
            param.div_(d._broadcast(d.vector.to(param.dtype)))

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {"ia3_l": self.ia3_l.detach()}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        self.ia3_l.copy_(state["ia3_l"])
