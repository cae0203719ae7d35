"""LoRA-SB: initialisation by update approximation, a silver bullet for low-rank fine-tuning (Ponkshe et al. 2024,
https://arxiv.org/abs/2411.19557).

    ΔW = B (R − R₀) A          B (out×r) and A (r×in) frozen and orthonormal; only the r×r matrix R trains
    y  = W₀x + b + B ((R − R₀) (A x))

The LoRA-XS architecture (a trainable r×r matrix between fixed B and A) with the paper's start: B R₀ A is the best
rank-r approximation of the first step full fine-tuning would take. From the mean gradient Ḡ = ∂L/∂W₀ over the
calibration batches:

    ΔW₁ = −init_lr · sign(Ḡ)   (update "adam": AdamW's first step, what the authors' code computes)
       or −init_lr · Ḡ         (update "sgd")
    ΔW₁ = U S Vᵀ;   B = U_r,  A = V_rᵀ,  R₀ = diag(S_r)       (Eckart–Young: B R₀ A is ΔW₁'s best rank-r approximation)

There is no scaling factor (s = 1, the authors' setting alpha = r): with B and A orthonormal the update of R is the
gradient projected on the two subspaces, the paper's "no scaling to tune". As splice does for every start (PiSSA,
LoRA-GA), the frozen start B R₀ A is subtracted in the layer, so the adapted model equals the base at
initialisation and the update against the base is B (R − R₀) A, exact, LowRank of rank ≤ r. R trains from R₀ along
exactly the gradients it would have without the subtraction (ΔW is linear in R); only the starting weights differ.

Which start is used (`init_weights`):
- "gradient": the paper's start above; needs calibration batches (`splice.adapt(model, config, calibration=...,
  calibration_loss=...)`; `splice train` passes its first training batches);
- "svd": data-free, LoRA-XS style: B, A the top-r singular vectors of W₀ (float32), R₀ = 0;
- "auto" (default): "gradient" when calibration batches are given, "svd" otherwise. The adapter records the start
  it took in its `init` attribute; a layer the calibration loss does not reach (zero gradient) keeps "svd".

Trainable parameters per module: r². The frozen B, A, R₀ are persistent buffers saved with the adapter. PEFT has no
LoRA-SB: the folder says `peft_type: null`, `splice_method: "lora_sb"`. Wraps nn.Linear and HF Conv1D.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.registry import register
from splice.adapters.svd_common import Factored, check_kind, check_rank, dtype_of, positive_int, svd, weight_matrix
from splice.errors import SpliceError

INITS = ("auto", "gradient", "svd")
UPDATES = ("adam", "sgd")


@dataclass
class LoraSBConfig(AdapterConfig):
    """LoRA-SB hyper-parameters."""

    r: int = doc("Rank: B is out×r, A is r×in, and the r×r matrix R trains (r² numbers).", default=24)
    init_weights: Literal["auto", "gradient", "svd"] = doc(
        "Start: gradient (B R₀ A = best rank-r approximation of the first full fine-tuning step, from calibration "
        "batches), svd (data-free: B, A the top singular vectors of the weight, R₀ = 0) or auto (gradient when "
        "calibration batches are given, svd otherwise).", default="auto")
    update: Literal["adam", "sgd"] = doc(
        "How the first full fine-tuning step is estimated from the mean gradient Ḡ: adam (−init_lr·sign(Ḡ), "
        "AdamW's first step) or sgd (−init_lr·Ḡ).", default="adam")
    init_lr: float = doc("Learning rate of that estimated first step (it sets the size of R₀ only).", default=1e-3)

    params_formula: ClassVar[str] = "r² (the matrix R)"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self.r, "r")
        if self.init_weights not in INITS:
            raise SpliceError(f"init_weights: must be one of {', '.join(INITS)}, got {self.init_weights!r}")
        if self.update not in UPDATES:
            raise SpliceError(f"update: must be one of {', '.join(UPDATES)}, got {self.update!r}")
        if isinstance(self.init_lr, bool) or not isinstance(self.init_lr, (int, float)) or not self.init_lr > 0:
            raise SpliceError(f"init_lr: must be a positive number, got {self.init_lr!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.init_weights != "svd"

    def calibrate(self, model: nn.Module, built: list, calibration: Iterable[Any] | None,
                  calibration_loss: Callable[[Any], Tensor] | None) -> list:
        """Start every adapter from the first gradient of the calibration batches (`adapt` calls this).

        Args:
            built: (name, module, kind, adapter) as `adapt` built them (with the data-free start).
        """
        from splice.adapters.inits import weight_gradients

        if calibration is None:
            if self.init_weights == "gradient":
                raise SpliceError("init_weights: gradient is data-driven; pass calibration batches "
                                  "(splice.adapt(model, config, calibration=batches))")
            return built
        if self.init_weights == "svd":
            raise SpliceError("calibration data given, but init_weights='svd' does not use it; use 'gradient' "
                              "or 'auto'")
        grads = weight_gradients(model, built, calibration, calibration_loss, "lora_sb")
        for name, _, _, adapter in built:
            adapter.start(first_step(grads[name], self))
        return built


def first_step(grad: Tensor, config: LoraSBConfig) -> Tensor:
    """The estimated first full fine-tuning update ΔW₁ (out, in) from the mean gradient."""
    step = grad.sign() if config.update == "adam" else grad
    return -config.init_lr * step.float()


@register("lora_sb", config=LoraSBConfig, reference="https://arxiv.org/abs/2411.19557")
class LoraSBAdapter(Factored):
    """One LoRA-SB adapter: the trained R between frozen orthonormal B and A, minus its frozen start R₀."""

    peft_keys: ClassVar[tuple[str, ...]] = ("lora_sb_R", "lora_sb_R0", "lora_sb_B", "lora_sb_A")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: LoraSBConfig) -> dict[str, tuple[int, ...]]:
        in_f, out_f = check_kind("lora_sb", base, kind)
        r = config.r
        return {"lora_sb_R": (r, r), "lora_sb_R0": (r, r), "lora_sb_B": (out_f, r), "lora_sb_A": (r, in_f)}

    def __init__(self, base: nn.Module, kind: str, config: LoraSBConfig):
        super().__init__()
        in_f, out_f = check_kind("lora_sb", base, kind)
        check_rank(config.r, in_f, out_f)
        self.kind, self.r, self.init = kind, config.r, "svd"
        U, _, Vh = svd(weight_matrix(base, kind))  # the data-free start; `start` replaces it from a gradient
        dt = dtype_of(base)
        self.lora_sb_R = nn.Parameter(torch.zeros(config.r, config.r, device=U.device, dtype=dt))
        self.register_buffer("lora_sb_R0", torch.zeros(config.r, config.r, device=U.device, dtype=dt))
        self.register_buffer("lora_sb_B", U[:, : config.r].to(dt).contiguous())  # (out, r)
        self.register_buffer("lora_sb_A", Vh[: config.r].to(dt).contiguous())  # (r, in)

    @torch.no_grad()
    def start(self, update: Tensor) -> None:
        """B, A, R₀ from the top-r SVD of an (out, in) update: B R₀ A is its best rank-r approximation. A zero
        update (a layer the calibration loss does not reach) keeps the data-free start."""
        if not bool(update.any()):
            return
        U, S, Vh = svd(update)
        r, dt = self.r, self.lora_sb_R.dtype
        self.lora_sb_B.copy_(U[:, :r].to(dt))
        self.lora_sb_A.copy_(Vh[:r].to(dt))
        self.lora_sb_R0.copy_(torch.diag(S[:r]).to(dt))
        self.lora_sb_R.copy_(self.lora_sb_R0)
        self.init = "gradient"

    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        super().load_peft_state(state, base)
        self.init = "gradient" if bool(self.lora_sb_R0.any()) else "svd"

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_sb_B, (self.lora_sb_R - self.lora_sb_R0) @ self.lora_sb_A

    def extra_repr(self) -> str:
        return f"r={self.r}, init={self.init}"
