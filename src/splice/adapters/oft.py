"""OFT: orthogonal fine-tuning (Qiu et al. 2023, https://arxiv.org/abs/2306.07280; the Cayley–Neumann form of
OFTv2, https://arxiv.org/abs/2506.19847).

    y = W₀ (R x) + b,   i.e.  W' = W₀ Rᵀ        R = diag(R₁, …, R_r): r orthogonal blocks of size b (r·b = in)
    R_i = (I − Q_i)(I + Q_i)⁻¹                    Q_i: skew-symmetric, its b(b−1)/2 upper entries trained (start 0)

R rotates the input features block by block, which keeps the angles between the neurons of W₀ (the paper's
hyperspherical energy). With `use_cayley_neumann` the inverse is replaced by its Neumann series as PEFT does
(R ≈ I + 2Q + 2Q² + … + 2Q^{k−2} + Q^{k−1}, k = num_cayley_neumann_terms); `block_share` uses one Q for every
block. The update depends on the base weight: `delta()` is Dense(W₀Rᵀ − W₀), and merge remembers what it added so
that unmerge restores W₀ (the truncated series is not exactly orthogonal): exactly in float32, to rounding in a
bfloat16 / float16 weight.

Give either r (blocks) or oft_block_size (b), as in PEFT; one that does not divide the layer's inputs is refused
(PEFT silently picks another). PEFT's tensor: `oft_R.weight` (r × b(b−1)/2, or 1 × … with block_share).
Wraps nn.Linear.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.extras import RotatedWeight
from splice.adapters.registry import register
from splice.errors import SpliceError


@dataclass
class OFTConfig(AdapterConfig):
    """OFT hyper-parameters; field names and meanings follow PEFT's `OFTConfig`."""

    r: int = doc("Number of orthogonal blocks per module (0: derived from oft_block_size).", default=0)
    oft_block_size: int = doc("Size b of each orthogonal block (0: derived from r); must divide in_features.",
                              default=32)
    module_dropout: float = doc("Training only: fraction of blocks replaced by the identity on each step.",
                                default=0.0)
    block_share: bool = doc("One rotation shared by every block of a module.", default=False)
    use_cayley_neumann: bool = doc("Approximate the Cayley inverse by its Neumann series (PEFT's default).",
                                   default=True)
    num_cayley_neumann_terms: int = doc("Terms of the Neumann series.", default=5)
    init_weights: bool = doc("Q at 0 (R = I, the identity update); false draws Q from N(0, 0.1²).", default=True)

    peft_type: ClassVar[str | None] = "OFT"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpliceError(f"{name}: must be a non-negative integer, got {value!r}")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise SpliceError(f"r / oft_block_size: give exactly one of them (the other 0), got r={self.r}, "
                              f"oft_block_size={self.oft_block_size}")
        if not 0.0 <= float(self.module_dropout) < 1.0:
            raise SpliceError(f"module_dropout: must be in [0, 1), got {self.module_dropout!r}")

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("coft"):
            raise SpliceError("coft=true (constrained OFT) is not supported by splice")
        if cfg.get("bias", "none") != "none":
            raise SpliceError(f"bias={cfg['bias']!r} is not supported by splice's oft (only 'none')")
        return {**super().fields_from_peft(cfg), "r": int(cfg.get("r", 0)),
                "oft_block_size": int(cfg.get("oft_block_size", 32)),
                "module_dropout": float(cfg.get("module_dropout", 0.0)),
                "block_share": bool(cfg.get("block_share", False)),
                "use_cayley_neumann": bool(cfg.get("use_cayley_neumann", True)),
                "num_cayley_neumann_terms": int(cfg.get("num_cayley_neumann_terms", 5)),
                "init_weights": bool(cfg.get("init_weights", True))}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        return {**super().to_peft(base=base, kinds=kinds, adapters=adapters), "r": self.r,
                "oft_block_size": self.oft_block_size, "module_dropout": self.module_dropout,
                "block_share": self.block_share, "use_cayley_neumann": self.use_cayley_neumann,
                "num_cayley_neumann_terms": self.num_cayley_neumann_terms, "init_weights": self.init_weights,
                "coft": False, "eps": 6e-5, "bias": "none", "fan_in_fan_out": False}

    def for_module(self, module: str, tensors: dict[str, Any], peft_cfg: dict[str, Any]) -> "OFTConfig":
        # PEFT may have adjusted a block size that did not divide a layer: the tensor says which one it used.
        b = round((1 + math.sqrt(1 + 8 * tensors["oft_R.weight"].shape[1])) / 2)
        config = copy.copy(self)
        config.r, config.oft_block_size = 0, b
        return config


def cayley(Q: Tensor, neumann_terms: int | None) -> Tensor:
    """R = (I − Q)(I + Q)⁻¹ for a batch of skew-symmetric Q (k, b, b); with `neumann_terms`, PEFT's series."""
    if neumann_terms is None:
        # The solve needs float32 at least: torch has no half-precision LU on CPU.
        exact = Q if Q.dtype in (torch.float32, torch.float64) else Q.float()
        eye = torch.eye(Q.shape[-1], device=Q.device, dtype=exact.dtype).expand_as(exact)
        return torch.linalg.solve(eye + exact, eye - exact, left=False).to(Q.dtype)
    eye = torch.eye(Q.shape[-1], device=Q.device, dtype=Q.dtype).expand_as(Q)
    R = eye.clone()
    if neumann_terms > 1:
        R = R + 2 * Q
    if neumann_terms > 2:
        power = Q @ Q
        R = R + 2 * power
        for _ in range(3, neumann_terms - 1):
            power = power @ Q
            R = R + 2 * power
        R = R + power @ Q  # the last term enters once, as in PEFT
    return R


@register("oft", config=OFTConfig, reference="https://arxiv.org/abs/2306.07280")
class OFTAdapter(RotatedWeight, nn.Module):
    """One OFT adapter (block-diagonal rotation of the inputs) on one nn.Linear."""

    peft_keys: ClassVar[tuple[str, ...]] = ("oft_R.weight",)

    @staticmethod
    def blocks(base: nn.Module, config: OFTConfig) -> tuple[int, int]:
        """(number of blocks, block size) for this layer, refusing sizes that do not divide its inputs."""
        in_f = base.in_features
        size = config.oft_block_size or (in_f // config.r if config.r and in_f % config.r == 0 else 0)
        if not size or in_f % size or size > in_f:
            name, value = ("oft_block_size", config.oft_block_size) if config.oft_block_size else ("r", config.r)
            raise SpliceError(f"{name}: {value} does not divide the layer's {in_f} inputs into equal blocks")
        return in_f // size, size

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: OFTConfig) -> dict[str, tuple[int, ...]]:
        n, b = cls.blocks(base, config)
        return {"oft_R.weight": (1 if config.block_share else n, b * (b - 1) // 2)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if "oft_R.weight" in tensors else "expected oft_R.weight"

    def __init__(self, base: nn.Module, kind: str, config: OFTConfig):
        super().__init__()
        if kind != "linear":
            raise SpliceError(f"oft cannot wrap {type(base).__name__}; it wraps nn.Linear")
        self.n, self.b = self.blocks(base, config)
        self.terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        self.dropout = float(config.module_dropout)
        shape = self.peft_shapes(base, kind, config)["oft_R.weight"]
        self.weight = nn.Parameter(torch.zeros(shape, device=base.weight.device, dtype=base.weight.dtype))
        if not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(self.weight, std=0.1)
        rows, cols = torch.triu_indices(self.b, self.b, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def rotations(self) -> Tensor:
        """The n rotation blocks R_i, (n, b, b)."""
        R = cayley(_skew(self.weight, self.rows, self.cols, self.b), self.terms)
        R = R.expand(self.n, -1, -1) if R.shape[0] == 1 else R
        if self.training and self.dropout and self.n > 1:  # multiplicative dropout: some blocks become I
            drop = torch.zeros(self.n, device=R.device)
            drop[torch.randperm(self.n)[: int(self.dropout * self.n)]] = 1
            eye = torch.eye(self.b, device=R.device, dtype=R.dtype)
            R = torch.where(drop.view(-1, 1, 1).bool(), eye, R)
        return R

    def rotate(self, x: Tensor) -> Tensor:
        """x R, block by block on the last axis."""
        xs = x.to(self.weight.dtype).reshape(*x.shape[:-1], self.n, self.b)
        return torch.einsum("...rk,rkc->...rc", xs, self.rotations()).reshape(x.shape)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        return base(self.rotate(x).to(x.dtype))

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        return (base(self.rotate(x).to(x.dtype)) - base_out).to(base_out.dtype)  # W(Rx − x): the bias cancels

    def rotated_weight(self, base: nn.Module) -> Tensor:
        """W₀ Rᵀ: each b-wide column block of W₀ times its R_iᵀ."""
        W = base.weight.to(self.weight.dtype)
        blocks = W.reshape(W.shape[0], self.n, self.b)
        return torch.einsum("orc,rkc->ork", blocks, self.rotations()).reshape(W.shape)

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {"oft_R.weight": self.weight.detach()}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        self.weight.copy_(state["oft_R.weight"])


def _skew(vec: Tensor, rows: Tensor, cols: Tensor, b: int) -> Tensor:
    """The skew-symmetric (k, b, b) matrices whose upper triangles are the rows of `vec` (k, b(b−1)/2)."""
    upper = torch.zeros(vec.shape[0], b, b, device=vec.device, dtype=vec.dtype)
    upper = upper.index_put((torch.arange(vec.shape[0], device=vec.device)[:, None], rows[None], cols[None]), vec)
    return upper - upper.transpose(-2, -1)
