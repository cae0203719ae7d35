"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454).

    ΔW = diag(λ_b) B diag(λ_d) A          A: r×in, B: out×r   frozen, random, shared by every module
    y  = W₀x + b + λ_b ∘ (B (λ_d ∘ (A x)))   λ_d: r (starts at d_initial), λ_b: out (starts at 0 → ΔW = 0)

Only the two vectors train (r + out numbers per module). A and B are drawn once per adapter from a seeded generator
(`projection_prng_key`), sized for the largest targeted layer; each module uses their top-left corner
A[:, :in], B[:out, :] (as PEFT does, so the same key gives PEFT's matrices). They are saved once per folder as
`base_model.vera_A` / `base_model.vera_B` unless `save_projection` is false (then regenerated from the key).
`delta()` is exact and low rank: LowRank(λ_b ∘ B, λ_d ∘ A).

Wraps nn.Linear and HF Conv1D.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.lora import lora_update, module_dims
from splice.adapters.registry import register
from splice.adapters.targets import ATTENTION_ONLY_TARGETS
from splice.delta.forms import Delta
from splice.errors import SpliceError

KINDS = ("linear", "conv1d")


@dataclass
class VeraConfig(AdapterConfig):
    """VeRA hyper-parameters; field names and meanings follow PEFT's `VeraConfig`."""

    r: int = doc("Rank of the shared random projections (VeRA works with large r: only r + out numbers train).",
                 default=256)
    projection_prng_key: int = doc("Seed of the shared random projections A and B.", default=0)
    save_projection: bool = doc("Save A and B in the folder (otherwise they are regenerated from the seed).",
                                default=True)
    vera_dropout: float = doc("Dropout on the input of the VeRA branch (training only).", default=0.0)
    d_initial: float = doc("Initial value of every entry of λ_d.", default=0.1)
    init_weights: bool = doc("λ_b at 0 and λ_d at d_initial (ΔW = 0); false: λ_b at 1 and λ_d ~ N(0, 1).",
                             default=True)

    peft_type: ClassVar[str | None] = "VERA"
    target_table: ClassVar[dict[str, list[str]]] = ATTENTION_ONLY_TARGETS

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise SpliceError(f"r: must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.vera_dropout) < 1.0:
            raise SpliceError(f"vera_dropout: must be in [0, 1), got {self.vera_dropout!r}")

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("bias", "none") != "none":
            raise SpliceError(f"bias={cfg['bias']!r} is not supported by splice's vera (only 'none')")
        return {**super().fields_from_peft(cfg), "r": int(cfg.get("r", 256)),
                "projection_prng_key": int(cfg.get("projection_prng_key", 0)),
                "save_projection": bool(cfg.get("save_projection", True)),
                "vera_dropout": float(cfg.get("vera_dropout", 0.0)), "d_initial": float(cfg.get("d_initial", 0.1)),
                "init_weights": bool(cfg.get("init_weights", True))}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        out = super().to_peft(base=base, kinds=kinds, adapters=adapters)
        if out["exclude_modules"] is None:
            del out["exclude_modules"]  # PEFT's VeraConfig has no such field and warns about it
        return {**out, "r": self.r,
                "projection_prng_key": self.projection_prng_key, "save_projection": self.save_projection,
                "vera_dropout": self.vera_dropout, "d_initial": self.d_initial, "init_weights": self.init_weights,
                "fan_in_fan_out": "conv1d" in kinds, "bias": "none"}

    def prepare(self, targets: list[tuple[str, Any, str]], shared: dict[str, Tensor] | None) -> "VeraConfig":
        """A copy carrying the projections every module shares: the folder's, or drawn from the seed."""
        dims = [module_dims(m, k) for _, m, k in targets if k in KINDS]
        if not dims:  # nothing VeRA can wrap: the adapter of the first target will say so
            return self
        max_in, max_out = max(d[0] for d in dims), max(d[1] for d in dims)
        config = copy.copy(self)
        config.projections = Projections.build(self, max_in, max_out, shared or {}, targets[0][1].weight)
        return config


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Kaiming-uniform (gain √2, fan_in = shape[1]) from `generator`: PEFT's draw, so the same key gives its A, B."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class Projections(nn.Module):
    """The frozen A (r, max_in) and B (max_out, r), one object shared by every module of one adapter."""

    def __init__(self, A: Tensor, B: Tensor, save: bool):
        super().__init__()
        self.save = save
        # Not in state_dict: they are saved once per folder (peft_shared), not once per module.
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)

    @classmethod
    def build(cls, config: VeraConfig, max_in: int, max_out: int, shared: dict[str, Tensor],
              like: Tensor) -> "Projections":
        if shared:
            A, B = shared.get("vera_A"), shared.get("vera_B")
            if A is None or B is None:
                raise SpliceError("vera: the folder has one of vera_A / vera_B but not the other")
            if A.shape[0] != config.r or A.shape[1] < max_in or B.shape[1] != config.r or B.shape[0] < max_out:
                raise SpliceError(f"vera: projections vera_A {tuple(A.shape)} / vera_B {tuple(B.shape)} do not fit "
                                  f"r={config.r} and layers up to {max_in} → {max_out}")
        else:
            generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
            A = _kaiming((config.r, max_in), generator)
            B = _kaiming((max_out, config.r), generator)
        dt = like.dtype if like.is_floating_point() else torch.float32
        return cls(A.to(like.device, dt), B.to(like.device, dt), config.save_projection)


@register("vera", config=VeraConfig, reference="https://arxiv.org/abs/2310.11454")
class VeraAdapter(nn.Module):
    """One VeRA adapter (λ_b, λ_d) on one module, using its adapter's shared projections."""

    peft_keys: ClassVar[tuple[str, ...]] = ("vera_lambda_b", "vera_lambda_d")
    peft_shared_keys: ClassVar[tuple[str, ...]] = ("vera_A", "vera_B")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: VeraConfig) -> dict[str, tuple[int, ...]]:
        return {"vera_lambda_b": (module_dims(base, kind)[1],), "vera_lambda_d": (config.r,)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if {"vera_lambda_b", "vera_lambda_d"} <= tensors.keys() else "expected vera_lambda_b and _d"

    def __init__(self, base: nn.Module, kind: str, config: VeraConfig):
        super().__init__()
        if kind not in KINDS:
            raise SpliceError(f"vera cannot wrap {type(base).__name__}; it wraps nn.Linear and HF Conv1D")
        projections = getattr(config, "projections", None)
        if projections is None:
            raise SpliceError("vera: the config was not prepared with its shared projections (use splice.adapt)")
        self.kind = kind
        self.in_f, self.out_f = module_dims(base, kind)
        self.dropout = float(config.vera_dropout)
        self.projections = projections  # a submodule shared with the adapter's other modules
        dev, dt = projections.A.device, projections.A.dtype
        if config.init_weights:
            self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_f, device=dev, dtype=dt))
            self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), device=dev, dtype=dt))
        else:
            self.vera_lambda_b = nn.Parameter(torch.ones(self.out_f, device=dev, dtype=dt))
            self.vera_lambda_d = nn.Parameter(torch.randn(config.r, device=dev, dtype=dt))

    def factors(self) -> tuple[Tensor, Tensor]:
        """(B, A) of ΔW = B A as (out, r) and (r, in), the vectors folded in."""
        A = self.projections.A[:, : self.in_f]
        B = self.projections.B[: self.out_f, :]
        return self.vera_lambda_b[:, None] * B, self.vera_lambda_d[:, None] * A

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        A = self.projections.A[:, : self.in_f]
        B = self.projections.B[: self.out_f, :]
        xd = F.dropout(x, self.dropout, self.training) if self.dropout else x
        h = F.linear(xd.to(A.dtype), A) * self.vera_lambda_d  # (…, r)
        return (F.linear(h, B) * self.vera_lambda_b).to(base_out.dtype)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        B, A = (t.detach() for t in self.factors())
        return {"weight": lora_update(B, A, 1.0, self.kind, base.weight.shape)}

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b.detach(), "vera_lambda_d": self.vera_lambda_d.detach()}

    def peft_shared(self) -> dict[str, Tensor]:
        if not self.projections.save:
            return {}
        return {"vera_A": self.projections.A, "vera_B": self.projections.B}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        self.vera_lambda_b.copy_(state["vera_lambda_b"])
        self.vera_lambda_d.copy_(state["vera_lambda_d"])
