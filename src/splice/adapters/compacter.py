"""Compacter: Kronecker hypercomplex adapters (Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex
Adapter Layers", https://arxiv.org/abs/2106.04647).

Houlsby's bottleneck (houlsby.py: y = h + W_up f(W_down h + b_down) + b_up on a projection's output h of width d)
whose two projections are low-rank PHM layers:

    W = Σ_{i=1..n} A_i ⊗ B_i,     B_i = s_i t_iᵀ          W: (out, in), A_i: (n, n), B_i: (out/n, in/n)
                                                            s_i: (out/n, r), t_i: (r, in/n)

The "slow" weights A_1..A_n are ONE trainable (n, n, n) tensor shared by both projections of every adapted module
of the model (one object: `CompacterConfig.prepare` makes it once per adapter, as VeRA's projections are made); the
"fast" rank-r factors s_i, t_i and the biases belong to each projection. A folder saves A once
(`base_model.phm_rule`).

Trainable parameters per wrapped module: 2·r·(d + m) + d + m (down d → m and up m → d, with biases), plus n³ for
the shared A_i, counted once per model.

Defaults are the paper's GLUE configuration (the authors' compacter.json): n = 4, rank 1, reduction factor 32,
the tanh-approximated GELU ("gelu_new"), and Compacter's placement, after the attention and the feed-forward output
projections (Houlsby's targets; Compacter++ is `target_modules=splice.adapters.pfeiffer.PFEIFFER_TARGETS`).
Choices where the paper leaves room or where its init does not suit splice:
- s_i, t_i are drawn Glorot-uniform (the paper's "glorot-uniform"), biases start at 0, and with init "identity"
  (default) the up-projection's s_i start at 0, so W_up = 0 and the model equals the base at init;
  "near_identity" keeps every factor random (the paper's start);
- A_i ~ N(0, σ²) with σ = `phm_init_range`, default 1/√n, which keeps Σ A_i ⊗ B_i at the scale of one B_i. The
  paper's GLUE runs use σ = 1e-4 at learning rate 3e-3 for 20 epochs; at that scale the adapter would barely move
  in the few hundred steps at 1e-3 that splice's defaults are sized for. Set phm_init_range=1e-4 for the paper's.
n must divide both d and m. Not a weight delta: merge, get_delta, apply and compress refuse it with one line.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from splice.adapters.config import doc
from splice.adapters.houlsby import ACTIVATIONS, HoulsbyAdapter, HoulsbyConfig, _floating
from splice.adapters.registry import register
from splice.errors import SpliceError

RULE = "phm_rule"  # the shared A_i, saved once per folder as base_model.phm_rule


@dataclass
class CompacterConfig(HoulsbyConfig):
    """Houlsby's fields (placement, bottleneck, non-linearity) plus the PHM layer's."""

    reduction_factor: float = doc("Bottleneck size m = d // reduction_factor for a module of output width d.",
                                  default=32.0)
    non_linearity: str = doc(f"The bottleneck's non-linearity f: {', '.join(ACTIVATIONS)}.", default="gelu_new")
    phm_dim: int = doc("n: the number of Kronecker summands and the size of each shared A_i (n × n); must divide "
                       "the module width and the bottleneck size.", default=4)
    phm_rank: int = doc("r: the rank of each per-layer factor B_i = s_i t_iᵀ.", default=1)
    phm_init_range: float | None = doc("Std of the shared A_i at init; null: 1/√phm_dim (the paper's GLUE runs "
                                       "use 1e-4 with a higher learning rate and longer training).", default=None)

    params_formula: ClassVar[str] = ("2·r·(out + m) + out + m (m = out // reduction_factor, r = phm_rank), plus "
                                     "phm_dim³ once per model (the shared A_i)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("phm_dim", "phm_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpliceError(f"{name}: must be a positive integer, got {value!r}")
        s = self.phm_init_range
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)
                              or s <= 0):
            raise SpliceError(f"phm_init_range: must be a positive number or null, got {s!r}")

    def prepare(self, targets: list[tuple[str, Any, str]], shared: dict[str, Tensor] | None) -> "CompacterConfig":
        """A copy carrying the A_i every module shares: the folder's, or drawn now."""
        config = copy.copy(self)
        like = next((m.weight for _, m, _ in targets if isinstance(getattr(m, "weight", None), Tensor)), None)
        config.rule = PHMRule.build(self, shared or {}, like)
        return config

    def phm_dims(self, d: int, m: int, where: str) -> None:
        """One line when n does not divide both widths, or r exceeds what a factor of that size can hold."""
        n, r = self.phm_dim, self.phm_rank
        if d % n or m % n:
            raise SpliceError(f"phm_dim: {n} must divide both the width {d} and the bottleneck size {m} of {where}; "
                              f"pick a phm_dim that does, or a bottleneck_size that is a multiple of {n}")
        if r > min(d, m) // n:
            raise SpliceError(f"phm_rank: {r} is larger than the {min(d, m) // n} a factor of size "
                              f"{m // n}×{d // n} can have ({where})")


class PHMRule(nn.Module):
    """The A_i of one adapter, (n, n, n): one object, a submodule of every Compacter module of that adapter."""

    def __init__(self, A: Tensor):
        super().__init__()
        self.A = nn.Parameter(A)

    @classmethod
    def build(cls, config: CompacterConfig, shared: dict[str, Tensor], like: Tensor | None) -> "PHMRule":
        n = config.phm_dim
        dev, dt = _floating(like) if like is not None else (torch.device("cpu"), torch.float32)
        if RULE in shared:
            A = shared[RULE]
            if tuple(A.shape) != (n, n, n):
                raise SpliceError(f"compacter: the folder's {RULE} has shape {tuple(A.shape)}, phm_dim={n} needs "
                                  f"{(n, n, n)}")
            return cls(A.detach().to(dev, dt).clone())
        std = config.phm_init_range if config.phm_init_range is not None else 1 / math.sqrt(n)
        return cls(torch.randn(n, n, n, device=dev, dtype=dt) * std)


def phm_weight(A: Tensor, B: Tensor) -> Tensor:
    """Σ_i A_i ⊗ B_i for A (n, n, n) and B (n, p, q): an (n·p, n·q) matrix, entry [a·p + b, c·q + e] =
    Σ_i A_i[a, c] B_i[b, e] (torch.kron's layout)."""
    n, p, q = B.shape
    return torch.einsum("iac,ibe->abce", A, B).reshape(n * p, n * q)


class PHMProjection(nn.Module):
    """The per-layer part of one PHM layer in → out: the factors s (n, out/n, r), t (n, r, in/n) and the bias."""

    def __init__(self, n: int, in_f: int, out_f: int, r: int, dev: torch.device, dt: torch.dtype):
        super().__init__()
        self.s = nn.Parameter(torch.empty(n, out_f // n, r, device=dev, dtype=dt))
        self.t = nn.Parameter(torch.empty(n, r, in_f // n, device=dev, dtype=dt))
        self.bias = nn.Parameter(torch.zeros(out_f, device=dev, dtype=dt))
        with torch.no_grad():
            for i in range(n):
                nn.init.xavier_uniform_(self.s[i])
                nn.init.xavier_uniform_(self.t[i])

    def weight(self, A: Tensor) -> Tensor:
        """W = Σ_i A_i ⊗ (s_i t_i), (out, in)."""
        return phm_weight(A, self.s @ self.t)


@register("compacter", config=CompacterConfig, reference="https://arxiv.org/abs/2106.04647")
class CompacterAdapter(HoulsbyAdapter):
    """A Houlsby bottleneck whose projections are PHM layers sharing their adapter's A_i."""

    peft_keys: ClassVar[tuple[str, ...]] = ("phm_down.s", "phm_down.t", "phm_down.bias", "phm_up.s", "phm_up.t",
                                            "phm_up.bias")
    peft_shared_keys: ClassVar[tuple[str, ...]] = (RULE,)

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: CompacterConfig) -> dict[str, tuple[int, ...]]:
        d, m = config.bottleneck(base, kind)
        n, r = config.phm_dim, config.phm_rank
        return {"phm_down.s": (n, m // n, r), "phm_down.t": (n, r, d // n), "phm_down.bias": (m,),
                "phm_up.s": (n, d // n, r), "phm_up.t": (n, r, m // n), "phm_up.bias": (d,)}

    def build(self, d: int, m: int, config: CompacterConfig, like: Tensor) -> None:
        config.phm_dims(d, m, f"module {getattr(config, 'target_name', '?')!r}")
        rule = getattr(config, "rule", None)
        if rule is None:
            raise SpliceError("compacter: the config was not prepared with its shared A_i (use splice.adapt)")
        dev, dt = _floating(like)
        n, r = config.phm_dim, config.phm_rank
        self.rule = rule  # a submodule shared with every other module of this adapter
        self.phm_down = PHMProjection(n, d, m, r, dev, dt)
        self.phm_up = PHMProjection(n, m, d, r, dev, dt)
        if config.init_weights == "identity":
            with torch.no_grad():
                self.phm_up.s.zero_()  # W_up = 0; the wider factor starts at 0, as LoRA's B does

    def projections(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        A = self.rule.A
        return self.phm_down.weight(A), self.phm_down.bias, self.phm_up.weight(A), self.phm_up.bias

    def peft_shared(self) -> dict[str, Tensor]:
        return {RULE: self.rule.A.detach()}
