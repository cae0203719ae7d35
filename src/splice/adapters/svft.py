"""SVFT: parameter-efficient fine-tuning with singular vectors (Lingam et al. 2024, https://arxiv.org/abs/2405.19597).

    W₀ = U S Vᵀ                 thin SVD of the frozen weight (float32); U (out×n), V (in×n), n = min(in, out) or
                                `rank` (the top-n singular vectors)
    ΔW = U M Vᵀ = Σ_(i,j)∈Ω m_ij u_i v_jᵀ      M (n×n) sparse: only the entries on the fixed pattern Ω train
    y  = (W₀ + ΔW) x + b        (the layer adds ΔW to the weight and runs one matmul, as the authors' code does)

Patterns Ω (the paper's four):
- plain: the diagonal, n entries (i = j): the singular values of W₀ get trained offsets;
- banded: |i − j| ≤ off_diag, n(2d + 1) − d(d + 1) entries for d = off_diag < n;
- random: k entries drawn uniformly without repetition from the n×n positions (seeded by `random_seed`);
- top_k: the k pairs (i, j) whose singular vectors are most aligned, |u_iᵀ v_j| largest (the paper's rule; it
  needs a square weight, in = out, for u_i and v_j to live in the same space).
For random and top_k, k defaults to the banded budget of `off_diag`, as the authors' code does.

Defaults (the abstract fixes none): the authors' code's — `pattern="banded"` with `off_diag=0` (their SVFT-plain
runs), i.e. the diagonal, over all n = min(in, out) singular vectors (`rank=None`). Where the authors' code starts
M at small random values behind a trainable sigmoid gate, splice starts M at 0 with no gate, so the model starts
as the base and the trained numbers are exactly the pattern's entries.

Trainable parameters per module: |Ω| (n for plain). `delta()` is exact and in the smaller of two forms: LowRank
U_R · (M_RC V_Cᵀ) over the rows R / columns C of M that the pattern touches, or Dense when that is not smaller
(plain at full rank). The folder stores the values and the pattern (`svft_values`, `svft_indices`); the singular
vectors are recomputed from the base at load (the float32 SVD is deterministic, its signs are fixed, and the
folder's fingerprints refuse another base) unless `save_singular_vectors` stores them too. PEFT has no SVFT: the
folder says `peft_type: null`, `splice_method: "svft"`. Wraps nn.Linear and HF Conv1D.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.lora import linear_weight
from splice.adapters.registry import register
from splice.adapters.svd_common import check_kind, check_rank, dtype_of, positive_int, svd, weight_matrix
from splice.delta.forms import Delta, Dense, LowRank
from splice.errors import SpliceError, closest

PATTERNS = ("plain", "banded", "random", "top_k")


@dataclass
class SVFTConfig(AdapterConfig):
    """SVFT hyper-parameters; names follow the authors' code (pattern, off_diag, rank)."""

    pattern: Literal["plain", "banded", "random", "top_k"] = doc(
        "Which entries of M train: plain (the diagonal), banded (|i − j| ≤ off_diag), random (k random entries) or "
        "top_k (the k most aligned singular-vector pairs |u_iᵀ v_j|; square weights only).", default="banded")
    off_diag: int = doc("Bandwidth d of the banded pattern (0 is the plain diagonal); also sets k for random and "
                        "top_k when k is not given (the same budget n(2d + 1) − d(d + 1)).", default=0)
    k: int | None = doc("Trained entries of the random and top_k patterns (None: the banded budget of off_diag).",
                        default=None)
    rank: int | None = doc("Singular vectors used (the top ones); None: all min(in, out), the authors' default.",
                           default=None)
    random_seed: int = doc("Seed of the random pattern.", default=0)
    save_singular_vectors: bool = doc("Save U and V in the folder (otherwise recomputed from the base at load).",
                                      default=False)

    params_formula: ClassVar[str] = ("|Ω|: n = min(in, out) (or rank) for plain; n(2d + 1) − d(d + 1) for banded with "
                                     "off_diag d < n; that budget (or k) for random and top_k")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern not in PATTERNS:
            raise SpliceError(f"pattern: must be one of {', '.join(PATTERNS)}, got {self.pattern!r}"
                              f"{closest(str(self.pattern), PATTERNS)}")
        if isinstance(self.off_diag, bool) or not isinstance(self.off_diag, int) or self.off_diag < 0:
            raise SpliceError(f"off_diag: must be an integer ≥ 0, got {self.off_diag!r}")
        for name in ("k", "rank"):
            if getattr(self, name) is not None:
                positive_int(getattr(self, name), name)
        if self.k is not None and self.pattern in ("plain", "banded"):
            raise SpliceError(f"k: sets the size of the random and top_k patterns; pattern {self.pattern!r} is "
                              "sized by off_diag")
        if isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int):
            raise SpliceError(f"random_seed: must be an integer, got {self.random_seed!r}")


def band(n: int, d: int) -> Tensor:
    """(2, count) positions (i, j) of an n×n matrix with |i − j| ≤ d, row-major."""
    i = torch.arange(n)
    return torch.stack(torch.nonzero((i[:, None] - i[None, :]).abs() <= d, as_tuple=True))


def pattern_size(config: SVFTConfig, n: int) -> int:
    if config.pattern == "plain":
        return n
    if config.pattern == "banded" or config.k is None:
        d = min(config.off_diag, n - 1)
        return n * (2 * d + 1) - d * (d + 1)
    return config.k


def positions(config: SVFTConfig, n: int, U: Tensor, Vh: Tensor, layer: str) -> Tensor:
    """(2, |Ω|) long: the trained entries (i, j) of M, row-major, for the top-n singular vectors U, Vh."""
    count = pattern_size(config, n)
    if count > n * n:
        raise SpliceError(f"k: {count} entries do not fit the {n}×{n} matrix M of layer {layer}")
    if config.pattern == "plain":
        return torch.arange(n).repeat(2, 1)
    if config.pattern == "banded":
        return band(n, config.off_diag)
    if config.pattern == "random":
        generator = torch.Generator().manual_seed(config.random_seed)
        flat = torch.randperm(n * n, generator=generator)[:count]
    else:  # top_k: alignment |u_iᵀ v_j| of the left and right singular vectors
        if U.shape[0] != Vh.shape[1]:
            raise SpliceError(f"pattern: top_k aligns left and right singular vectors, which needs a square weight; "
                              f"layer {layer} is not (use plain, banded or random there)")
        scores = (U.t() @ Vh.t()).abs().flatten().cpu()  # (n·n,) entry i·n + j = |u_iᵀ v_j|
        flat = torch.topk(scores, count).indices
    flat = flat.sort().values
    return torch.stack([flat // n, flat % n])


def _is_diagonal(index: Tensor, n: int) -> bool:
    """Whether the pattern is the plain diagonal in order: value i sits at (i, i)."""
    diag = torch.arange(n, device=index.device)
    return index.shape[1] == n and bool((index[0] == diag).all() and (index[1] == diag).all())


@register("svft", config=SVFTConfig, reference="https://arxiv.org/abs/2405.19597")
class SVFTAdapter(nn.Module):
    """One SVFT adapter: trained values of M on a fixed pattern, over the frozen singular vectors of the weight."""

    peft_keys: ClassVar[tuple[str, ...]] = ("svft_values", "svft_indices", "svft_U", "svft_Vh")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: SVFTConfig) -> dict[str, tuple[int, ...]]:
        in_f, out_f = check_kind("svft", base, kind)
        n = config.rank or min(in_f, out_f)
        count = pattern_size(config, n)
        out = {"svft_values": (count,), "svft_indices": (2, count)}
        if config.save_singular_vectors:
            out.update({"svft_U": (out_f, n), "svft_Vh": (n, in_f)})
        return out

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if {"svft_values", "svft_indices"} <= tensors.keys() else "expected svft_values and svft_indices"

    def __init__(self, base: nn.Module, kind: str, config: SVFTConfig):
        super().__init__()
        in_f, out_f = check_kind("svft", base, kind)
        n = config.rank or min(in_f, out_f)
        check_rank(n, in_f, out_f, "rank")
        self.kind, self.n, self.save = kind, n, config.save_singular_vectors
        U, _, Vh = svd(weight_matrix(base, kind))
        index = positions(config, n, U[:, :n], Vh[:n], f"{in_f} → {out_f}")
        dt = dtype_of(base)
        self.register_buffer("svft_U", U[:, :n].to(dt).contiguous())  # (out, n)
        self.register_buffer("svft_Vh", Vh[:n].to(dt).contiguous())  # (n, in)
        self.register_buffer("svft_indices", index.to(U.device))
        self.svft_values = nn.Parameter(torch.zeros(index.shape[1], device=U.device, dtype=dt))
        self.diagonal = _is_diagonal(index, n)

    def matrix(self) -> Tensor:
        """M as a dense (n, n) matrix: the trained values on the pattern, 0 elsewhere (differentiable)."""
        M = torch.zeros(self.n, self.n, device=self.svft_values.device, dtype=self.svft_values.dtype)
        return M.index_put((self.svft_indices[0], self.svft_indices[1]), self.svft_values)

    def update(self) -> Tensor:
        """ΔW = U M Vᵀ as an (out, in) matrix (differentiable in the values)."""
        if self.diagonal:  # plain: U diag(m) Vᵀ without the n×n matrix
            return (self.svft_U * self.svft_values) @ self.svft_Vh
        return self.svft_U @ (self.matrix() @ self.svft_Vh)

    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        weight = linear_weight(base, self.kind) + self.update().to(base.weight.dtype)
        return F.linear(x.to(weight.dtype), weight, base.bias)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        delta = self.update()
        return F.linear(x.to(delta.dtype), delta).to(base_out.dtype)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        rows, cols = (torch.unique(i) for i in self.svft_indices)
        M = self.matrix().detach()[rows][:, cols]  # (|R|, |C|)
        U, Vh = self.svft_U[:, rows], self.svft_Vh[cols]
        out_f, in_f = U.shape[0], Vh.shape[1]
        if min(len(rows), len(cols)) * (out_f + in_f) >= out_f * in_f:
            update = U @ M @ Vh
            return {"weight": Dense((update.t() if self.kind == "conv1d" else update).contiguous())}
        B, A = (U, M @ Vh) if len(rows) <= len(cols) else (U @ M, Vh)
        if self.kind == "conv1d":  # the weight is (in, out): ΔWᵀ = Aᵀ Bᵀ
            B, A = A.t(), B.t()
        return {"weight": LowRank(B.contiguous(), A.contiguous(), 1.0, base.weight.shape)}

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        out = {"svft_values": self.svft_values.detach(), "svft_indices": self.svft_indices.to(torch.int32)}
        if self.save:
            out.update({"svft_U": self.svft_U, "svft_Vh": self.svft_Vh})
        return out

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        index = state["svft_indices"].long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n):
            raise SpliceError(f"svft_indices: positions outside the {self.n}×{self.n} matrix M")
        self.svft_indices = index.to(self.svft_indices.device)
        self.diagonal = _is_diagonal(index, self.n)
        self.svft_values.copy_(state["svft_values"])
        if "svft_U" in state:
            self.svft_U.copy_(state["svft_U"])
            self.svft_Vh.copy_(state["svft_Vh"])

    def extra_repr(self) -> str:
        return f"n={self.n}, entries={self.svft_values.numel()}"
