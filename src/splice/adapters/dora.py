"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

    W' = m ∘ (W₀ + s·B A) / ‖W₀ + s·B A‖_row          m starts at ‖W₀‖_row, so W' = W₀ at init

The direction is updated by LoRA and the per-output-row magnitude m is trained directly. As in the paper (§4.3)
and PEFT, the norm is treated as a constant in backward. Dropout, when set, applies to the low-rank branch only
(PEFT also re-runs the base matmul on the dropped input; with dropout 0 and in eval the two are identical).

Saved in PEFT's format as a LoRA with `use_dora: true` and a `lora_magnitude_vector` per module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.lora import LoraAdapter, LoraConfig, linear_weight, module_dims
from splice.adapters.ops import dora_row_norm, lora_linear
from splice.adapters.registry import register
from splice.delta.forms import Delta, Dense
from splice.errors import SpliceError


def dora_update(W: Tensor, A: Tensor, B: Tensor, magnitude: Tensor, scale: float) -> Tensor:
    """m/‖W + sBA‖_row ∘ (W + sBA) − W for an (out, in) weight: DoRA's update of W, dense (it rescales all of W)."""
    W = W.float()
    merged = torch.addmm(W, B.float(), A.float(), alpha=scale)
    col = magnitude.float() / merged.norm(dim=1)
    return col[:, None] * merged - W


@dataclass
class DoraConfig(LoraConfig):
    """LoRA's fields; the magnitude vector is added to every wrapped module."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_lora_weights not in ("kaiming", "gaussian"):
            raise SpliceError(f"init_lora_weights: {self.init_lora_weights} is not available with dora; "
                              "use kaiming or gaussian")

    @classmethod
    def claims_peft(cls, cfg: dict[str, Any]) -> bool:
        return bool(cfg.get("use_dora"))


@register("dora", config=DoraConfig, reference="https://arxiv.org/abs/2402.09353")
class DoraAdapter(LoraAdapter):
    """LoRA plus a trainable magnitude per output row, on nn.Linear and HF Conv1D."""

    peft_keys: ClassVar[tuple[str, ...]] = (*LoraAdapter.peft_keys, "lora_magnitude_vector",
                                            "lora_magnitude_vector.weight")
    peft_aliases: ClassVar[dict[str, str]] = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: DoraConfig) -> dict[str, tuple[int, ...]]:
        return {**super().peft_shapes(base, kind, config), "lora_magnitude_vector": (module_dims(base, kind)[1],)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        if "lora_magnitude_vector" not in tensors:
            return "no lora_magnitude_vector (use_dora)"
        return super().peft_missing(tensors)

    def __init__(self, base: nn.Module, kind: str, config: DoraConfig):
        if kind not in ("linear", "conv1d"):
            raise SpliceError(f"dora cannot wrap {type(base).__name__}; it wraps nn.Linear and HF Conv1D")
        super().__init__(base, kind, config)
        self.lora_magnitude_vector = nn.Parameter(self.row_norm(base).detach().clone())

    def row_norm(self, base: nn.Module) -> Tensor:
        W = linear_weight(base, self.kind)
        return dora_row_norm(W, self.lora_A.detach(), self.lora_B.detach(), self.scale).detach()

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        bias = base.bias if self.lora_bias is None else base.bias + self.lora_bias
        p = self.dropout if self.training else 0.0
        W = linear_weight(base, self.kind)
        return lora_linear(x, W, bias, self.lora_A, self.lora_B, self.scale, p, magnitude=self.lora_magnitude_vector)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        W = linear_weight(base, self.kind)
        col = self.lora_magnitude_vector / self.row_norm(base)
        xd = F.dropout(x, self.dropout, self.training) if self.dropout else x
        lora = (xd.to(W.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        out = (col - 1) * F.linear(x.to(W.dtype), W) + col * lora * self.scale
        if self.lora_bias is not None:
            out = out + self.lora_bias
        return out.to(base_out.dtype)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        W = linear_weight(base, self.kind).detach()
        update = dora_update(W, self.lora_A.detach(), self.lora_B.detach(), self.lora_magnitude_vector.detach(),
                             self.scale).to(W.dtype)
        out: dict[str, Delta] = {"weight": Dense(update.t() if self.kind == "conv1d" else update)}
        if self.lora_bias is not None:
            out["bias"] = Dense(self.lora_bias.detach())
        return out

    @torch.no_grad()
    def merge(self, base: nn.Module) -> Tensor:
        """W ← m/‖W + sBA‖ ∘ (W + sBA); returns the column scale needed to undo it exactly."""
        W = linear_weight(base, self.kind)
        col = self.lora_magnitude_vector / self.row_norm(base)
        W.addmm_(self.lora_B, self.lora_A, alpha=self.scale).mul_(col[:, None])
        if self.lora_bias is not None:
            base.bias.add_(self.lora_bias)
        return col

    @torch.no_grad()
    def unmerge(self, base: nn.Module, col: Tensor) -> None:
        W = linear_weight(base, self.kind)
        W.div_(col[:, None]).addmm_(self.lora_B, self.lora_A, alpha=-self.scale)
        if self.lora_bias is not None:
            base.bias.sub_(self.lora_bias)

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {**super().peft_state(base), "lora_magnitude_vector": self.lora_magnitude_vector.detach()}

    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        super().load_peft_state(state, base)
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(state["lora_magnitude_vector"])
