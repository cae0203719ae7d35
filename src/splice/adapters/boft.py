"""BOFT: butterfly orthogonal fine-tuning (Liu et al. 2024, https://arxiv.org/abs/2311.06243).

    y = s ⊙ (W₀ (R x)) + b,   i.e.  W' = diag(s) W₀ Rᵀ = ((R W₀ᵀ)ᵀ scaled row by row by s)
    R = M_{m−1} ⋯ M₁ M₀        M_i = P_i diag(R_{i,1}, …, R_{i,D}) P_iᵀ      (m = boft_n_butterfly_factor)
    R_{i,j} = (I − S_{i,j})(I + S_{i,j})⁻¹,   S = (A − Aᵀ)/2   A: a trained b × b matrix (start 0, so R = I)

Each butterfly factor M_i is a block-diagonal matrix of D orthogonal Cayley blocks of size b (D·b = in), conjugated
by the butterfly permutation P_i: P₀ = I, and P_i (i ≥ 1) interleaves the half-blocks inside every group of 2^i
blocks, so that the product of m factors mixes 2^{m−1} blocks' worth of features while each factor stays cheap. R
is orthogonal (the angles between W₀'s neurons are kept, as in OFT), and s (out, start 1) rescales the outputs.
With m = 1 BOFT is OFT with the exact Cayley transform plus the scale s. Follows PEFT's construction exactly;
where PEFT uses its CUDA extension for the block-diagonal matrices (needed there for m > 1; without it PEFT quietly
uses m = 1), splice applies the factors with index gathers and batched block products in plain torch.

The update depends on the base weight: `delta()` is Dense(diag(s) W₀ Rᵀ − W₀), and merge remembers what it added
so that unmerge restores W₀ (exactly in float32, to rounding in bf16/fp16). Give exactly one of boft_block_size (b) and boft_block_num (D), as in PEFT;
one that does not divide the layer's inputs, or a butterfly that does not fit (m > 1 needs D a multiple of 2^{m−1}
and b even), is refused. PEFT's tensors: `boft_R` (m × D × b × b, the full A; only its skew part counts) and
`boft_s` (out × 1). Wraps nn.Linear.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.extras import RotatedWeight
from splice.adapters.oft import cayley
from splice.adapters.registry import register
from splice.errors import SpliceError


@dataclass
class BOFTConfig(AdapterConfig):
    """BOFT hyper-parameters; field names and meanings follow PEFT's `BOFTConfig`."""

    boft_block_size: int = doc("Size b of each orthogonal block (0: derived from boft_block_num); must divide "
                               "in_features.", default=4)
    boft_block_num: int = doc("Number D of orthogonal blocks per factor (0: derived from boft_block_size); must "
                              "divide in_features.", default=0)
    boft_n_butterfly_factor: int = doc("Number m of butterfly factors (1: block-diagonal, i.e. OFT; each further "
                                       "factor doubles the span of features one block mixes).", default=1)
    boft_dropout: float = doc("Training only: in one randomly chosen factor, this fraction of its blocks is replaced "
                              "by the identity on each step (PEFT's multiplicative dropout).", default=0.0)
    init_weights: bool = doc("A at 0 and s at 1 (R = I, the identity update); false draws A from N(0, 0.1²) and s "
                             "from N(1, 0.1²).", default=True)

    peft_type: ClassVar[str | None] = "BOFT"
    params_formula: ClassVar[str] = ("m·in·b + out (m factors of D = in/b blocks of b × b, stored whole as PEFT "
                                     "does: m·D·b(b−1)/2 of them are free; and the output scale s)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpliceError(f"{name}: must be a non-negative integer, got {value!r}")
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise SpliceError(f"boft_block_size / boft_block_num: give exactly one of them (the other 0), got "
                              f"boft_block_size={self.boft_block_size}, boft_block_num={self.boft_block_num}")
        if self.boft_n_butterfly_factor < 1:
            raise SpliceError(f"boft_n_butterfly_factor: must be at least 1 (1: one block-diagonal factor, as OFT), "
                              f"got {self.boft_n_butterfly_factor}")
        if isinstance(self.boft_dropout, bool) or not 0.0 <= float(self.boft_dropout) < 1.0:
            raise SpliceError(f"boft_dropout: must be in [0, 1), got {self.boft_dropout!r}")

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("bias", "none") != "none":
            raise SpliceError(f"bias={cfg['bias']!r} is not supported by splice's boft (only 'none')")
        return {**super().fields_from_peft(cfg), "boft_block_size": int(cfg.get("boft_block_size", 4)),
                "boft_block_num": int(cfg.get("boft_block_num", 0)),
                "boft_n_butterfly_factor": int(cfg.get("boft_n_butterfly_factor", 1)),
                "boft_dropout": float(cfg.get("boft_dropout", 0.0)),
                "init_weights": bool(cfg.get("init_weights", True))}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        return {**super().to_peft(base=base, kinds=kinds, adapters=adapters),
                "boft_block_size": self.boft_block_size, "boft_block_num": self.boft_block_num,
                "boft_n_butterfly_factor": self.boft_n_butterfly_factor, "boft_dropout": self.boft_dropout,
                "init_weights": self.init_weights, "bias": "none", "fan_in_fan_out": False,
                "layers_to_transform": None, "layers_pattern": None}

    def for_module(self, module: str, tensors: dict[str, Any], peft_cfg: dict[str, Any]) -> "BOFTConfig":
        # The tensor says which layout was used: PEFT without its CUDA extension builds one factor whatever its
        # config says, and a folder's block count and size are those of each layer.
        m, _, b, _ = tensors["boft_R"].shape
        config = copy.copy(self)
        config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor = b, 0, m
        return config


def butterfly_permutation(n: int, block_size: int, level: int) -> Tensor:
    """p with P[j, p[j]] = 1 for the butterfly permutation P of factor `level` (PEFT's `block_butterfly_perm`).

    Inside each group of 2^level blocks, the half-blocks (b/2 wide) are reordered evens first, then odds; level 0
    is the identity.
    """
    if level == 0:
        return torch.arange(n)
    half, group = block_size // 2, block_size * 2 ** level
    positions = [*range(0, group // half, 2), *range(1, group // half, 2)]
    order = torch.cat([torch.arange(p * half, (p + 1) * half) for p in positions])
    return torch.arange(n).view(-1, group)[:, order].reshape(n)


@register("boft", config=BOFTConfig, reference="https://arxiv.org/abs/2311.06243")
class BOFTAdapter(RotatedWeight, nn.Module):
    """One BOFT adapter (a product of permuted block-diagonal rotations of the inputs, and an output scale) on one
    nn.Linear."""

    peft_keys: ClassVar[tuple[str, ...]] = ("boft_R", "boft_s")

    @staticmethod
    def layout(base: nn.Module, config: BOFTConfig) -> tuple[int, int, int]:
        """(factors m, blocks per factor D, block size b) for this layer, refusing what does not fit its inputs."""
        in_f, m = base.in_features, config.boft_n_butterfly_factor
        name, value = (("boft_block_size", config.boft_block_size) if config.boft_block_size
                       else ("boft_block_num", config.boft_block_num))
        if in_f % value:
            raise SpliceError(f"{name}: {value} does not divide the layer's {in_f} inputs into equal blocks")
        n, b = (in_f // value, value) if config.boft_block_size else (value, in_f // value)
        if m > 1 and n % 2 ** (m - 1):
            raise SpliceError(f"boft_n_butterfly_factor: {m} factors need a multiple of {2 ** (m - 1)} blocks, but "
                              f"{name} {value} makes {n} blocks of {b} of the layer's {in_f} inputs")
        if m > 1 and b % 2:
            raise SpliceError(f"boft_n_butterfly_factor: {m} factors need an even block size, but {name} {value} "
                              f"makes {n} blocks of {b} of the layer's {in_f} inputs")
        return m, n, b

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: BOFTConfig) -> dict[str, tuple[int, ...]]:
        m, n, b = cls.layout(base, config)
        return {"boft_R": (m, n, b, b), "boft_s": (base.out_features, 1)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        missing = [k for k in cls.peft_keys if k not in tensors]
        return f"expected {' and '.join(missing)}" if missing else None

    def __init__(self, base: nn.Module, kind: str, config: BOFTConfig):
        super().__init__()
        if kind != "linear":
            raise SpliceError(f"boft cannot wrap {type(base).__name__}; it wraps nn.Linear")
        self.m, self.n, self.b = self.layout(base, config)
        self.dropout = float(config.boft_dropout)
        shapes = self.peft_shapes(base, kind, config)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.boft_R = nn.Parameter(torch.zeros(shapes["boft_R"], **like))
        self.boft_s = nn.Parameter(torch.ones(shapes["boft_s"], **like))
        if not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(self.boft_R, std=0.1)
                nn.init.normal_(self.boft_s, mean=1.0, std=0.1)
        in_f = base.in_features
        perms = torch.stack([butterfly_permutation(in_f, self.b, i) for i in range(self.m)])
        self.register_buffer("perm", perms.to(base.weight.device), persistent=False)
        self.register_buffer("inverse", torch.argsort(perms, dim=1).to(base.weight.device), persistent=False)
        self.permuted = [i > 0 for i in range(self.m)]  # P₀ = I

    def blocks(self) -> Tensor:
        """The orthogonal blocks R_{i,j} of every factor, (m, D, b, b)."""
        A = self.boft_R.reshape(self.m * self.n, self.b, self.b)
        R = cayley(0.5 * (A - A.transpose(-2, -1)), None).view(self.m, self.n, self.b, self.b)
        if self.training and self.dropout:  # PEFT's multiplicative dropout: blocks of one random factor become I
            drop = torch.zeros(self.m, self.n, 1, 1, device=R.device, dtype=torch.bool)
            drop[torch.randint(self.m, ()), torch.randperm(self.n)[: int(self.dropout * self.n)]] = True
            R = torch.where(drop, torch.eye(self.b, device=R.device, dtype=R.dtype), R)
        return R

    def rotate(self, x: Tensor, transpose: bool = False) -> Tensor:
        """x R (or x Rᵀ) on the last axis, one factor at a time: x M_i = ((x P_i) diag(R_i)) P_iᵀ."""
        R = self.blocks()
        for i in (range(self.m) if transpose else reversed(range(self.m))):
            if self.permuted[i]:
                x = x.index_select(-1, self.inverse[i])  # x P_i
            blocks = R[i].transpose(-2, -1) if transpose else R[i]
            xs = x.reshape(*x.shape[:-1], self.n, self.b)
            x = torch.einsum("...rk,rkc->...rc", xs, blocks).reshape(x.shape)
            if self.permuted[i]:
                x = x.index_select(-1, self.perm[i])  # · P_iᵀ
        return x

    def rotation(self) -> Tensor:
        """R as a dense in × in matrix."""
        return self.rotate(torch.eye(self.n * self.b, device=self.boft_R.device, dtype=self.boft_R.dtype))

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        out = base(self.rotate(x.to(self.boft_R.dtype)).to(x.dtype))
        s = self.boft_s.view(-1).to(out.dtype)
        bias = getattr(base, "bias", None)
        return out * s if bias is None else (out - bias) * s + bias  # the bias is not scaled, as in PEFT

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        return (self.fused_forward(x, base) - base_out).to(base_out.dtype)

    def rotated_weight(self, base: nn.Module) -> Tensor:
        """diag(s) W₀ Rᵀ: every row of W₀ times Rᵀ, then scaled by its s."""
        return self.rotate(base.weight.to(self.boft_R.dtype), transpose=True) * self.boft_s

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {"boft_R": self.boft_R.detach(), "boft_s": self.boft_s.detach()}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        self.boft_R.copy_(state["boft_R"])
        self.boft_s.copy_(state["boft_s"])
