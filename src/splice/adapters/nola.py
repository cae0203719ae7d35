"""NOLA: compressing LoRA with linear combinations of random bases (Koohpayegani et al. 2024,
https://arxiv.org/abs/2310.02556).

    A = Σ_{i=1..k} α_i A_i      A_i: r×in    frozen random bases, drawn from a seed
    B = Σ_{j=1..l} β_j B_j      B_j: out×r
    ΔW = (lora_alpha / r) · B A                 y = W₀x + b + (lora_alpha / r) · B (A x)

Only the k + l mixture coefficients train, so the count no longer depends on the rank or the layer's shape.
β starts at 0 (ΔW = 0) and α at N(0, 1/in), which gives A the spread of LoRA's Kaiming-initialised A so that the
gradient of β is not zero at the start (the authors' code reaches the same by adding a frozen Kaiming matrix to A
and starting α at 0). `delta()` is exact: LowRank(B, A).

Bases as in the authors' code (https://github.com/UCDvision/NOLA, `GenerateParams`): entries uniform in (−1, 1)
divided by √(number of bases); rank 8 and 1024 bases for A and for B, the code's defaults (`nola_num_basis`
1024, `nola_rank` 8 in its GPT-2 runs). They are drawn once per adapter from a generator seeded with `seed`,
sized for the largest targeted layer, and shared by every module, which uses their top-left corners (as VeRA's
projections: `vera.Projections`). They are never saved: a folder holds the coefficients and the seed, and loading
regenerates the bases from the seed for the same targets.

Wraps nn.Linear and HF Conv1D. Saved as `nola_alpha` (k,) and `nola_beta` (l,); PEFT has no NOLA
(`peft_type: null`, `splice_method: nola`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.lora import linear_weight, lora_update, module_dims
from splice.adapters.ops import lora_linear
from splice.adapters.registry import register
from splice.adapters.sparse import KINDS, check_int, check_kind, check_positive_int, value_dtype
from splice.adapters.vera import Projections
from splice.delta.forms import Delta
from splice.errors import SpliceError


@dataclass
class NolaConfig(AdapterConfig):
    """NOLA hyper-parameters."""

    r: int = doc("Rank of A (r×in) and B (out×r).", default=8)
    num_basis_A: int = doc("k: random bases mixed into A (its trained coefficients α).", default=1024)
    num_basis_B: int = doc("l: random bases mixed into B (its trained coefficients β).", default=1024)
    lora_alpha: float = doc("Scaling numerator: ΔW = lora_alpha / r · B A.", default=8)
    seed: int = doc("Seed of the random bases (the folder keeps it; the bases are regenerated from it).", default=0)

    params_formula: ClassVar[str] = "num_basis_A + num_basis_B (k + l mixture coefficients)"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "num_basis_A", "num_basis_B"):
            check_positive_int(name, getattr(self, name))
        check_int("seed", self.seed)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def prepare(self, targets: list[tuple[str, Any, str]], shared: dict[str, Tensor] | None) -> "NolaConfig":
        """A copy carrying the bases every module shares, drawn from the seed for the largest targeted layer."""
        dims = [module_dims(m, k) for _, m, k in targets if k in KINDS]
        if not dims:  # nothing NOLA can wrap: the adapter of the first target will say so
            return self
        config = copy.copy(self)
        A, B = random_bases(self, max(d[0] for d in dims), max(d[1] for d in dims))
        weight = targets[0][1].weight
        dt = value_dtype(weight)
        config.bases = Projections(A.to(weight.device, dt), B.to(weight.device, dt), save=False)
        return config


def random_bases(config: NolaConfig, max_in: int, max_out: int) -> tuple[Tensor, Tensor]:
    """The bases for this seed: A (k, r, max_in) then B (l, max_out, r), uniform in (−1, 1) / √(bases)."""
    generator = torch.Generator().manual_seed(config.seed)
    k, l, r = config.num_basis_A, config.num_basis_B, config.r
    A = (torch.rand(k, r, max_in, generator=generator) * 2 - 1) / math.sqrt(k)
    B = (torch.rand(l, max_out, r, generator=generator) * 2 - 1) / math.sqrt(l)
    return A, B


@register("nola", config=NolaConfig, reference="https://arxiv.org/abs/2310.02556")
class NolaAdapter(nn.Module):
    """One NOLA adapter (α, β) on one module, mixing its adapter's shared bases."""

    peft_keys: ClassVar[tuple[str, ...]] = ("nola_alpha", "nola_beta")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: NolaConfig) -> dict[str, tuple[int, ...]]:
        return {"nola_alpha": (config.num_basis_A,), "nola_beta": (config.num_basis_B,)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if {"nola_alpha", "nola_beta"} <= tensors.keys() else "expected nola_alpha and nola_beta"

    def __init__(self, base: nn.Module, kind: str, config: NolaConfig):
        super().__init__()
        check_kind("nola", base, kind)
        bases = getattr(config, "bases", None)
        if bases is None:
            raise SpliceError("nola: the config was not prepared with its shared bases (use splice.adapt)")
        self.kind, self.r, self.scale = kind, config.r, config.scaling
        self.in_f, self.out_f = module_dims(base, kind)
        self.bases = bases  # a submodule shared with the adapter's other modules (its buffers are not saved)
        dev, dt = bases.A.device, bases.A.dtype
        self.nola_alpha = nn.Parameter(torch.randn(config.num_basis_A, device=dev, dtype=dt) / math.sqrt(self.in_f))
        self.nola_beta = nn.Parameter(torch.zeros(config.num_basis_B, device=dev, dtype=dt))

    def factors(self) -> tuple[Tensor, Tensor]:
        """(B, A) as (out, r) and (r, in): the coefficient mixtures of the bases' corners."""
        bases_A, bases_B = self.bases.A, self.bases.B  # (k, r, max_in), (l, max_out, r)
        A = (self.nola_alpha @ bases_A.flatten(1)).view(self.r, -1)[:, : self.in_f]
        B = (self.nola_beta @ bases_B.flatten(1)).view(-1, self.r)[: self.out_f]
        return B, A

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        B, A = self.factors()
        return lora_linear(x, linear_weight(base, self.kind), base.bias, A.contiguous(), B, self.scale, 0.0)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        B, A = self.factors()
        return ((x.to(A.dtype) @ (A * self.scale).t()) @ B.t()).to(base_out.dtype)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        B, A = (t.detach() for t in self.factors())
        return {"weight": lora_update(B, A.contiguous(), self.scale, self.kind, base.weight.shape)}

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {"nola_alpha": self.nola_alpha.detach(), "nola_beta": self.nola_beta.detach()}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        self.nola_alpha.copy_(state["nola_alpha"])
        self.nola_beta.copy_(state["nola_beta"])
