"""RandLoRA: full-rank parameter-efficient fine-tuning from random bases (Albert et al. 2025,
https://arxiv.org/abs/2502.00987).

    ΔW = (α/r) · Σ_{b=1..n} B_b Λ_b A Γ_b       A: r×d, B_b: D×r  frozen, random, shared by every module
                                                Λ_b = diag(λ[:, b]) (r), Γ_b = diag(γ[b]) (d)   trained
    d = min(in, out), D = max(in, out), n = ⌈d / r⌉ bases, so that the sum can reach full rank.

λ starts at 0 (ΔW = 0) and γ at 1/max(n, d). A and B are drawn once per adapter from a seeded generator
(`projection_prng_key`; PEFT's draw: Kaiming-uniform in bfloat16, or ternary with `sparse` / `very_sparse`), each
normalised by its standard deviation, and sized for the largest targeted layer; each module uses their corners.
The update is exactly LowRank of rank n·r (`delta()`), flattened in PEFT's order (its forward multiplies the
(r·n)-row factor with the (n·r)-column one as they are, and so does this one). Wraps nn.Linear and HF Conv1D.
PEFT's tensors: randlora_lambda, randlora_gamma per module; randlora_A / randlora_B once (and, as PEFT writes them,
again under each module) unless `save_projection` is false.
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
from splice.delta.forms import Delta
from splice.errors import SpliceError

KINDS = ("linear", "conv1d")


@dataclass
class RandLoraConfig(AdapterConfig):
    """RandLoRA hyper-parameters; field names and meanings follow PEFT's `RandLoraConfig`."""

    r: int = doc("Rank of each random basis (⌈min(in, out) / r⌉ bases per module).", default=32)
    randlora_alpha: float = doc("Scaling numerator: the update is scaled by randlora_alpha / r.", default=640)
    randlora_dropout: float = doc("Dropout on the input of the RandLoRA branch (training only).", default=0.0)
    projection_prng_key: int = doc("Seed of the shared random bases.", default=0)
    save_projection: bool = doc("Save the bases in the folder (otherwise they are regenerated from the seed).",
                                default=True)
    sparse: bool = doc("Ternary sparse bases (entries −1, 0, 1 with probabilities 1/6, 2/3, 1/6).", default=False)
    very_sparse: bool = doc("Ternary bases with non-zero probability 1/√min(in, out).", default=False)
    init_weights: bool = doc("λ at 0 (ΔW = 0) and γ at 1/max(n, d); false: λ ~ N(0, 1), γ at 1.", default=True)

    peft_type: ClassVar[str | None] = "RANDLORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise SpliceError(f"r: must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.randlora_dropout) < 1.0:
            raise SpliceError(f"randlora_dropout: must be in [0, 1), got {self.randlora_dropout!r}")

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("bias", "none") != "none":
            raise SpliceError(f"bias={cfg['bias']!r} is not supported by splice's randlora (only 'none')")
        return {**super().fields_from_peft(cfg), "r": int(cfg.get("r", 32)),
                "randlora_alpha": cfg.get("randlora_alpha", 640),
                "randlora_dropout": float(cfg.get("randlora_dropout", 0.0)),
                "projection_prng_key": int(cfg.get("projection_prng_key", 0)),
                "save_projection": bool(cfg.get("save_projection", True)), "sparse": bool(cfg.get("sparse", False)),
                "very_sparse": bool(cfg.get("very_sparse", False)), "init_weights": bool(cfg.get("init_weights", True))}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        return {**super().to_peft(base=base, kinds=kinds, adapters=adapters), "r": self.r,
                "randlora_alpha": self.randlora_alpha, "randlora_dropout": self.randlora_dropout,
                "projection_prng_key": self.projection_prng_key, "save_projection": self.save_projection,
                "sparse": self.sparse, "very_sparse": self.very_sparse, "init_weights": self.init_weights,
                "fan_in_fan_out": "conv1d" in kinds, "bias": "none"}

    def prepare(self, targets: list[tuple[str, Any, str]], shared: dict[str, Tensor] | None) -> "RandLoraConfig":
        """A copy carrying the bases every module shares: the folder's, or drawn from the seed."""
        dims = [module_dims(m, k) for _, m, k in targets if k in KINDS]
        if not dims:  # nothing RandLoRA can wrap: the adapter of the first target will say so
            return self
        largest_in, largest_out = max(d[0] for d in dims), max(d[1] for d in dims)
        config = copy.copy(self)
        config.bases = Bases.build(self, largest_in, largest_out, shared or {}, targets[0][1].weight)
        return config


def _n_bases(min_dim: int, r: int) -> int:
    return math.ceil(min_dim / r)


def _draw(config: RandLoraConfig, largest_in: int, largest_out: int) -> tuple[Tensor, Tensor]:
    """PEFT's bases for this seed: A (r, 1, d) and B (D, n, r), each divided by its standard deviation."""
    big, small = max(largest_out, largest_in), min(largest_out, largest_in)
    n, r = _n_bases(small, config.r), config.r
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    if config.sparse or config.very_sparse:
        sparsity = math.sqrt(small) if config.very_sparse else 3
        A, B = torch.rand((r, 1, small), generator=generator), torch.rand((big, n, r), generator=generator)
        A, B = [torch.where(t < 1 / (2 * sparsity), -1.0, torch.where(t > 1 - 1 / (2 * sparsity), 1.0, 0.0))
                for t in (A, B)]
    else:
        def kaiming(shape: tuple[int, ...]) -> Tensor:  # PEFT draws them in bfloat16 (its choice on CPU)
            t = torch.empty(shape, dtype=torch.bfloat16)
            return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)

        A = kaiming((r, 1, small))
        B = torch.cat([kaiming((big, 1, r)) for _ in range(n)], dim=1)
    return (A / A.std()).float(), (B / B.std()).float()


class Bases(nn.Module):
    """The frozen A (r, 1, d) and B (D, n, r), one object shared by every module of one adapter."""

    def __init__(self, A: Tensor, B: Tensor, save: bool):
        super().__init__()
        self.save = save
        self.register_buffer("A", A, persistent=False)  # saved once per folder (peft_shared), not per module
        self.register_buffer("B", B, persistent=False)

    @classmethod
    def build(cls, config: RandLoraConfig, largest_in: int, largest_out: int, shared: dict[str, Tensor],
              like: Tensor) -> "Bases":
        big, small = max(largest_out, largest_in), min(largest_out, largest_in)
        if shared:
            A, B = shared.get("randlora_A"), shared.get("randlora_B")
            if A is None or B is None:
                raise SpliceError("randlora: the folder has one of randlora_A / randlora_B but not the other")
            n = _n_bases(small, config.r)
            if A.dim() != 3 or B.dim() != 3 or A.shape[0] != config.r or A.shape[2] < small or B.shape[0] < big \
                    or B.shape[1] < n or B.shape[2] != config.r:
                raise SpliceError(f"randlora: bases randlora_A {tuple(A.shape)} / randlora_B {tuple(B.shape)} do not "
                                  f"fit r={config.r} and layers up to {small} × {big}")
        else:
            A, B = _draw(config, largest_in, largest_out)
        dt = like.dtype if like.is_floating_point() else torch.float32
        return cls(A.to(like.device, dt), B.to(like.device, dt), config.save_projection)


@register("randlora", config=RandLoraConfig, reference="https://arxiv.org/abs/2502.00987")
class RandLoraAdapter(nn.Module):
    """One RandLoRA adapter (λ, γ) on one module, using its adapter's shared bases."""

    peft_keys: ClassVar[tuple[str, ...]] = ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")
    peft_shared_keys: ClassVar[tuple[str, ...]] = ("randlora_A", "randlora_B")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: RandLoraConfig) -> dict[str, tuple[int, ...]]:
        in_f, out_f = module_dims(base, kind)
        small, n = min(in_f, out_f), _n_bases(min(in_f, out_f), config.r)
        shapes = {"randlora_lambda": (config.r, n), "randlora_gamma": (n, small)}
        bases = getattr(config, "bases", None)
        if config.save_projection and bases is not None:  # PEFT writes the shared bases under every module too
            shapes.update(randlora_A=tuple(bases.A.shape), randlora_B=tuple(bases.B.shape))
        return shapes

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        need = {"randlora_lambda", "randlora_gamma"}
        return None if need <= tensors.keys() else "expected randlora_lambda and randlora_gamma"

    def __init__(self, base: nn.Module, kind: str, config: RandLoraConfig):
        super().__init__()
        if kind not in KINDS:
            raise SpliceError(f"randlora cannot wrap {type(base).__name__}; it wraps nn.Linear and HF Conv1D")
        bases = getattr(config, "bases", None)
        if bases is None:
            raise SpliceError("randlora: the config was not prepared with its shared bases (use splice.adapt)")
        self.kind = kind
        self.in_f, self.out_f = module_dims(base, kind)
        self.small, self.big = min(self.in_f, self.out_f), max(self.in_f, self.out_f)
        self.n = _n_bases(self.small, config.r)
        self.scale = config.randlora_alpha / config.r
        self.dropout = float(config.randlora_dropout)
        self.bases = bases  # a submodule shared with the adapter's other modules
        dev, dt = bases.A.device, bases.A.dtype
        if config.init_weights:
            self.randlora_lambda = nn.Parameter(torch.zeros(config.r, self.n, device=dev, dtype=dt))
            self.randlora_gamma = nn.Parameter(torch.full((self.n, self.small), 1 / max(self.n, self.small),
                                                          device=dev, dtype=dt))
        else:
            self.randlora_lambda = nn.Parameter(torch.randn(config.r, self.n, device=dev, dtype=dt))
            self.randlora_gamma = nn.Parameter(torch.ones(self.n, self.small, device=dev, dtype=dt))

    def factors(self) -> tuple[Tensor, Tensor]:
        """(B, A) of ΔW/scale = B A, as (out, n·r) and (n·r, in)."""
        A = self.bases.A[:, : self.n, : self.small]  # (r, 1, d): one A for every basis
        B = self.bases.B[: self.big, : self.n, :].flatten(1)  # (D, n·r)
        scaled = (self.randlora_lambda[:, :, None] * A * self.randlora_gamma[None]).flatten(end_dim=1)  # (r·n, d)
        if self.small == self.in_f:
            return B, scaled
        return scaled.t(), B.t()

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        B, A = self.factors()
        xd = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return (F.linear(F.linear(xd.to(A.dtype), A), B) * self.scale).to(base_out.dtype)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        B, A = (t.detach() for t in self.factors())
        return {"weight": lora_update(B.contiguous(), A.contiguous(), self.scale, self.kind, base.weight.shape)}

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        out = {"randlora_lambda": self.randlora_lambda.detach(), "randlora_gamma": self.randlora_gamma.detach()}
        if self.bases.save:
            out.update(randlora_A=self.bases.A, randlora_B=self.bases.B)
        return out

    def peft_shared(self) -> dict[str, Tensor]:
        return {"randlora_A": self.bases.A, "randlora_B": self.bases.B} if self.bases.save else {}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        # The per-module copies of the bases are the shared ones, already in place.
        self.randlora_lambda.copy_(state["randlora_lambda"])
        self.randlora_gamma.copy_(state["randlora_gamma"])
