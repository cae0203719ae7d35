"""BitFit: train only the bias terms (Ben Zaken et al. 2022, https://arxiv.org/abs/2106.10199).

    y = W₀x + (b₀ + Δb)          Δb trains (starts at 0); every weight stays frozen

The update is exact and additive: Dense(Δb) on each targeted module's bias. By default the biases of every linear
layer (except the output head) train; name LayerNorms (or any module with a bias) in `target_modules` to add
theirs, as in the paper.

PEFT has no BitFit, so the folder keeps PEFT's shape but says so: adapter_config.json has `peft_type: null` and
`splice_method: "bitfit"` (PEFT refuses it with its own error), and each module's trained bias is saved as
`<module>.bitfit_bias`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.extras import BiasShift
from splice.adapters.registry import register
from splice.errors import SpliceError

KEY = "bitfit_bias"


@dataclass
class BitFitConfig(AdapterConfig):
    """Which modules' biases train."""

    target_modules: list[str] | str = doc(
        "Modules whose bias trains: name suffixes, one regex, or 'all-linear' (every linear layer but the head); "
        "any module with a bias can be named (LayerNorm, Conv2d, ...).", default="all-linear")

    wraps_any_module: ClassVar[bool] = True
    params_formula: ClassVar[str] = "out (the module's bias)"


@register("bitfit", config=BitFitConfig, reference="https://arxiv.org/abs/2106.10199")
class BitFitAdapter(BiasShift):
    """A trained change of one module's bias."""

    peft_keys: ClassVar[tuple[str, ...]] = (KEY,)

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: BitFitConfig) -> dict[str, tuple[int, ...]]:
        return {KEY: tuple(base.bias.shape)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if KEY in tensors else f"expected {KEY}"

    def __init__(self, base: nn.Module, kind: str, config: BitFitConfig):
        if not isinstance(getattr(base, "bias", None), Tensor):
            raise SpliceError(f"bitfit cannot wrap {type(base).__name__}: it has no bias")
        super().__init__(base)

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {KEY: (base.bias + self.shift).detach()}  # the trained bias itself, as PEFT stores biases

    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        super().load_peft_state({"bias": state[KEY]}, base)
