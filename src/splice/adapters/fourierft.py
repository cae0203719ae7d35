"""FourierFT: parameter-efficient fine-tuning with the discrete Fourier transform (Gao et al. 2024,
https://arxiv.org/abs/2405.03003).

    ΔW = α · Re(IDFT₂(F))          F: out×in spectrum, zero except n trained coefficients at fixed random positions
    y  = W₀x + b + ΔW x            the coefficients start at N(0, 1) (PEFT's default), or at 0 with init_weights

n coefficients per module (often far fewer than LoRA's r·(in + out)) describe a dense update. The positions are
PEFT's: the first n of a permutation of the out·in entries drawn from `torch.Generator` seeded with
`random_loc_seed`; they are not saved (PEFT regenerates them from the seed), only the coefficients
`fourierft_spectrum` are. IDFT₂ is torch.fft.ifft2 (normalised by 1/(out·in)). `delta()` is Dense.
Wraps nn.Linear and HF Conv1D.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc, pattern_value
from splice.adapters.lora import module_dims
from splice.adapters.registry import register
from splice.adapters.targets import FOURIERFT_TARGETS
from splice.delta.forms import Delta, Dense
from splice.errors import SpliceError

KINDS = ("linear", "conv1d")


@dataclass
class FourierFTConfig(AdapterConfig):
    """FourierFT hyper-parameters; field names and meanings follow PEFT's `FourierFTConfig`."""

    n_frequency: int = doc("Trained spectral coefficients per module (at most in·out).", default=1000)
    scaling: float = doc("α: the update is α times the inverse DFT of the spectrum.", default=150.0)
    random_loc_seed: int = doc("Seed of the coefficients' positions in the spectrum.", default=777)
    n_frequency_pattern: dict[str, int] = doc(
        "Per-module n_frequency: module name (suffix or regex, PEFT's syntax) → count.", default_factory=dict)
    init_weights: bool = doc("Start the coefficients at 0 (ΔW = 0); false draws them from N(0, 1).", default=False)

    peft_type: ClassVar[str | None] = "FOURIERFT"
    target_table: ClassVar[dict[str, list[str]]] = FOURIERFT_TARGETS

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_frequency_pattern, dict):
            raise SpliceError(f"n_frequency_pattern: must be a mapping of module name → count, got "
                              f"{self.n_frequency_pattern!r}")
        for name, value in (("n_frequency", self.n_frequency), *(("n_frequency_pattern", v)
                                                                 for v in self.n_frequency_pattern.values())):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpliceError(f"{name}: must be a positive integer, got {value!r}")
        if isinstance(self.random_loc_seed, bool) or not isinstance(self.random_loc_seed, int):
            raise SpliceError(f"random_loc_seed: must be an integer, got {self.random_loc_seed!r}")

    def for_target(self, name: str) -> "FourierFTConfig":
        import dataclasses

        return dataclasses.replace(self, n_frequency=pattern_value(name, self.n_frequency_pattern, self.n_frequency))

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("bias", "none") != "none":
            raise SpliceError(f"bias={cfg['bias']!r} is not supported by splice's fourierft (only 'none')")
        return {**super().fields_from_peft(cfg), "n_frequency": int(cfg.get("n_frequency", 1000)),
                "scaling": float(cfg.get("scaling", 150.0)), "random_loc_seed": int(cfg.get("random_loc_seed", 777)),
                "n_frequency_pattern": dict(cfg.get("n_frequency_pattern") or {}),
                "init_weights": bool(cfg.get("init_weights", False))}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        return {**super().to_peft(base=base, kinds=kinds, adapters=adapters), "n_frequency": self.n_frequency,
                "scaling": self.scaling, "random_loc_seed": self.random_loc_seed,
                "n_frequency_pattern": dict(self.n_frequency_pattern), "init_weights": self.init_weights,
                "fan_in_fan_out": "conv1d" in kinds, "bias": "none"}


@register("fourierft", config=FourierFTConfig, reference="https://arxiv.org/abs/2405.03003")
class FourierFTAdapter(nn.Module):
    """One FourierFT adapter: n spectral coefficients of one module's update."""

    peft_keys: ClassVar[tuple[str, ...]] = ("fourierft_spectrum",)

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: FourierFTConfig) -> dict[str, tuple[int, ...]]:
        return {"fourierft_spectrum": (config.n_frequency,)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if "fourierft_spectrum" in tensors else "expected fourierft_spectrum"

    def __init__(self, base: nn.Module, kind: str, config: FourierFTConfig):
        super().__init__()
        if kind not in KINDS:
            raise SpliceError(f"fourierft cannot wrap {type(base).__name__}; it wraps nn.Linear and HF Conv1D")
        in_f, out_f = module_dims(base, kind)
        if config.n_frequency > in_f * out_f:
            raise SpliceError(f"n_frequency: {config.n_frequency} coefficients is more than the layer's "
                              f"{in_f * out_f} ({in_f} → {out_f})")
        self.kind, self.in_f, self.out_f = kind, in_f, out_f
        self.scaling = float(config.scaling)
        dev, dt = base.weight.device, base.weight.dtype
        init = torch.zeros if config.init_weights else torch.randn
        self.fourierft_spectrum = nn.Parameter(init(config.n_frequency, device=dev, dtype=dt))
        flat = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(config.random_loc_seed))
        flat = flat[: config.n_frequency]
        self.register_buffer("indices", torch.stack([flat // in_f, flat % in_f]).to(dev), persistent=False)

    def update(self) -> Tensor:
        """ΔW as an (out, in) matrix, differentiable in the coefficients."""
        spectrum = torch.zeros(self.out_f, self.in_f, device=self.indices.device, dtype=torch.float32)
        spectrum = spectrum.index_put((self.indices[0], self.indices[1]), self.fourierft_spectrum.float())
        return (torch.fft.ifft2(spectrum).real * self.scaling).to(self.fourierft_spectrum.dtype)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        update = self.update()
        return F.linear(x.to(update.dtype), update).to(base_out.dtype)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        with torch.no_grad():
            update = self.update()
        return {"weight": Dense(update.t().contiguous() if self.kind == "conv1d" else update)}

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {"fourierft_spectrum": self.fourierft_spectrum.detach()}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        self.fourierft_spectrum.copy_(state["fourierft_spectrum"])
