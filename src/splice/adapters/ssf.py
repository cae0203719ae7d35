"""SSF: scaling and shifting your features (Lian et al. 2022, https://arxiv.org/abs/2210.08823).

A learned scale γ and shift β on the output features of each targeted module:

    y = γ ∘ (W₀x + b) + β          γ, β: out (γ starts at 1, β at 0 → the base at init)

It re-parameterises into the frozen weights, so `delta()` is exact and cheap:

    W' = diag(γ) W₀   → Scale(γ) along W's output axis (multiplicative, as IA3's; ΔW = (γ − 1) ∘ rows of W₀)
    b' = γ ∘ b + β    → Dense((γ − 1) ∘ b + β) on the bias

Merge multiplies the weight by γ and sets the bias to γ ∘ b + β; unmerge undoes both (divides by γ), as IA3's does.

A module without a bias (Llama's projections, RMSNorm) has nowhere to fold β into: its shift is not a weight delta.
With `shift="all"` (default: the paper's method, β on every module) such an adapter trains, saves and serves as
usual, but merge / get_delta / apply refuse it with one line naming the module and the option below. With
`shift="where_bias"`, modules without a bias get γ only, and the whole adapter merges.

Trainable parameters per wrapped module: 2·out (γ and β); out where a module without a bias gets no shift.

Wraps nn.Linear, HF Conv1D, nn.Conv2d (per output channel) and, named in `target_modules`, normalisation layers with
a 1-D weight whose features are the last axis (LayerNorm, RMSNorm), as the paper inserts SSF after its norm layers
too. Default targets: all-linear.

Init: γ = 1, β = 0 by default (the adapted model equals the base); `init_weights="paper"` draws γ ~ N(1, 0.02²) and
β ~ N(0, 0.02²) as the authors' code does. The folder keeps PEFT's shape with `peft_type: null`,
`splice_method: "ssf"` and tensors `<module>.ssf_scale` / `<module>.ssf_shift`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.lora import module_dims
from splice.adapters.registry import register
from splice.delta.forms import Delta, Dense, Scale
from splice.errors import SpliceError, closest

SHIFTS = ("all", "where_bias")
INITS = ("identity", "paper")
_CHANNEL_FIRST_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


@dataclass
class SSFConfig(AdapterConfig):
    """Where SSF's scale and shift go."""

    target_modules: list[str] | str = doc(
        "Modules whose output features are scaled and shifted: name suffixes, one regex, or 'all-linear' (every "
        "linear layer but the head); norm layers (LayerNorm, RMSNorm) can be named too.", default="all-linear")
    shift: str = doc("'all': a shift β on every module (the paper; a module without a bias cannot be merged then); "
                     "'where_bias': β only on modules with a bias, so the adapter always merges.", default="all")
    init_weights: str = doc("'identity': γ = 1, β = 0 (the base at init); 'paper': γ ~ N(1, 0.02²), β ~ N(0, 0.02²).",
                            default="identity")

    wraps_any_module: ClassVar[bool] = True
    params_formula: ClassVar[str] = "2·out (γ and β); out on a module without a bias when shift='where_bias'"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shift not in SHIFTS:
            raise SpliceError(f"shift: unknown {self.shift!r}{closest(str(self.shift), SHIFTS)}; choose one of "
                              f"{', '.join(SHIFTS)}")
        if self.init_weights not in INITS:
            hint = closest(str(self.init_weights), INITS)
            raise SpliceError(f"init_weights: unknown {self.init_weights!r}{hint}; choose one of {', '.join(INITS)}")

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        # Read by `splice apply`: GPT-2's Conv1D stores its weight (in, out), so γ scales its columns.
        return {**super().to_peft(base=base, kinds=kinds, adapters=adapters), "fan_in_fan_out": "conv1d" in kinds}

    def for_target(self, name: str) -> "SSFConfig":
        config = copy.copy(self)
        config.target_name = name  # not a field: names the module in messages, never saved
        return config


def _width(base: nn.Module, kind: str) -> int:
    """The number of output features SSF scales, or one line saying why it cannot wrap `base`."""
    if kind in ("linear", "conv1d", "conv2d"):
        if kind == "conv2d" and base.groups != 1:
            raise SpliceError(f"ssf cannot wrap a grouped Conv2d (groups={base.groups})")
        return module_dims(base, kind)[1]
    weight = getattr(base, "weight", None)
    if (kind != "module" or not isinstance(weight, Tensor) or weight.dim() != 1
            or isinstance(base, _CHANNEL_FIRST_NORMS)):
        raise SpliceError(f"ssf cannot wrap {type(base).__name__}; it wraps nn.Linear, HF Conv1D, nn.Conv2d and norm "
                          "layers with a 1-D weight over the last axis (LayerNorm, RMSNorm)")
    return weight.shape[0]


def _has_bias(base: nn.Module) -> bool:
    return isinstance(getattr(base, "bias", None), Tensor)


@register("ssf", config=SSFConfig, reference="https://arxiv.org/abs/2210.08823")
class SSFAdapter(nn.Module):
    """γ and β on one module's output features."""

    peft_keys: ClassVar[tuple[str, ...]] = ("ssf_scale", "ssf_shift")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: SSFConfig) -> dict[str, tuple[int, ...]]:
        out = _width(base, kind)
        shifted = config.shift == "all" or _has_bias(base)
        return {"ssf_scale": (out,), **({"ssf_shift": (out,)} if shifted else {})}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if "ssf_scale" in tensors else "expected ssf_scale"

    def __init__(self, base: nn.Module, kind: str, config: SSFConfig):
        super().__init__()
        out = _width(base, kind)
        self.kind = kind
        self.where = getattr(config, "target_name", type(base).__name__)  # for messages
        like = base.weight
        dev, dt = like.device, like.dtype if like.is_floating_point() else torch.float32
        paper = config.init_weights == "paper"
        scale = torch.ones(out, device=dev, dtype=dt)
        self.ssf_scale = nn.Parameter(scale + 0.02 * torch.randn_like(scale) if paper else scale)
        self.register_parameter("ssf_shift", None)
        if config.shift == "all" or _has_bias(base):
            self.ssf_shift = nn.Parameter(0.02 * torch.randn_like(scale) if paper else torch.zeros_like(scale))

    def _channels(self, t: Tensor) -> Tensor:
        """A vector shaped to broadcast over the output: the channel axis of a conv, the last axis otherwise."""
        return t.view(-1, 1, 1) if self.kind == "conv2d" else t

    # -- forward -------------------------------------------------------------------------------------------------
    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        out = base(x)
        y = out * self._channels(self.ssf_scale)
        if self.ssf_shift is not None:
            y = y + self._channels(self.ssf_shift)
        return y.to(out.dtype)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        change = base_out * self._channels(self.ssf_scale - 1)
        if self.ssf_shift is not None:
            change = change + self._channels(self.ssf_shift)
        return change.to(base_out.dtype)

    # -- the delta -----------------------------------------------------------------------------------------------
    def merge_refusal(self, base: nn.Module) -> str | None:
        """Why this module cannot be merged (None when it can): a shift with no bias to fold it into."""
        if self.ssf_shift is not None and not _has_bias(base):
            return (f"({type(base).__name__}) has no bias, so its ssf shift β is not a weight delta; train with "
                    "shift='where_bias' (β only where a bias exists) for an adapter that merges")
        return None

    def _refuse(self, base: nn.Module) -> None:
        reason = self.merge_refusal(base)
        if reason:
            raise SpliceError(f"ssf: module {self.where!r} {reason}")

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        self._refuse(base)
        gamma = self.ssf_scale.detach()
        W = base.weight
        out_axis = 1 if self.kind == "conv1d" else 0  # Conv1D stores (in, out); Linear, Conv2d and norms out first
        deltas: dict[str, Delta] = {"weight": Scale(gamma, out_axis, W.shape)}
        if _has_bias(base):
            b = base.bias.detach()
            shift = self.ssf_shift.detach() if self.ssf_shift is not None else torch.zeros_like(gamma)
            deltas["bias"] = Dense(((gamma - 1) * b + shift).to(b.dtype))
        return deltas

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        deltas = self.delta(base)
        deltas["weight"].apply_to(base.weight.data)
        if "bias" in deltas:
            deltas["bias"].apply_to(base.bias.data)

    @torch.no_grad()
    def unmerge(self, base: nn.Module, _: object = None) -> None:
        # Merged: W' = γ ∘ W, b' = γ ∘ b + β. Back: b = (b' − β) / γ, W = W' / γ.
        W = base.weight.data
        gamma = self.ssf_scale.detach()
        W.div_(Scale(gamma, 1 if self.kind == "conv1d" else 0, W.shape)._broadcast(gamma.to(W.dtype)))
        if _has_bias(base):
            b = base.bias.data
            if self.ssf_shift is not None:
                b.sub_(self.ssf_shift.detach().to(b.dtype))
            b.div_(gamma.to(b.dtype))

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        state = {"ssf_scale": self.ssf_scale.detach()}
        if self.ssf_shift is not None:
            state["ssf_shift"] = self.ssf_shift.detach()
        return state

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        self.ssf_scale.copy_(state["ssf_scale"])
        if self.ssf_shift is not None:
            self.ssf_shift.copy_(state["ssf_shift"])
