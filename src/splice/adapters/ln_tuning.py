"""LN tuning: train only the normalisation layers (Zhao et al. 2023, "Tuning LayerNorm in Attention",
https://arxiv.org/abs/2312.11420).

    LN(x) = γ ∘ (x − μ) / σ + β          γ, β train (a copy per adapter); everything else stays frozen

Each targeted module (typically every LayerNorm / RMSNorm) gets a trainable copy per adapter, and the adapter runs
that copy instead of the base module. The update is exact and additive: Dense(γ' − γ), Dense(β' − β).
Wraps modules of any type, as PEFT does; target them by name (`input_layernorm`, `LayerNorm`, ...).
PEFT's tensors: `<module>.ln_tuning_layers.weight` (and `.bias`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.extras import FullCopy
from splice.adapters.registry import register
from splice.errors import SpliceError

PREFIX = "ln_tuning_layers."


@dataclass
class LNTuningConfig(AdapterConfig):
    """Which modules to tune; field names follow PEFT's `LNTuningConfig`."""

    target_modules: list[str] | str = doc(
        "Modules to tune: name suffixes, or one regex; the default matches every module whose name ends in 'norm' "
        "(any case: LayerNorm, input_layernorm, model.norm) or is GPT-2's ln_1 / ln_2 / ln_f.",
        default=r"(?i).*(norm|\.ln_[^.]*)")

    peft_type: ClassVar[str | None] = "LN_TUNING"
    wraps_any_module: ClassVar[bool] = True


@register("ln_tuning", config=LNTuningConfig, reference="https://arxiv.org/abs/2312.11420")
class LNTuningAdapter(FullCopy):
    """A trainable copy of one (normalisation) module."""

    peft_keys: ClassVar[tuple[str, ...]] = (f"{PREFIX}weight", f"{PREFIX}bias")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: LNTuningConfig) -> dict[str, tuple[int, ...]]:
        return {PREFIX + n: tuple(p.shape) for n, p in base.named_parameters()}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if f"{PREFIX}weight" in tensors else f"expected {PREFIX}weight"

    def __init__(self, base: nn.Module, kind: str, config: LNTuningConfig):
        if not any(True for _ in base.parameters()):
            raise SpliceError(f"ln_tuning cannot wrap {type(base).__name__}: it has no parameters to tune")
        super().__init__(base)

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {PREFIX + k: v.detach() for k, v in self.module.named_parameters()}

    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        self.module.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()}, strict=False)
