"""EVA: explained variance adaptation (Paischer et al. 2024, https://arxiv.org/abs/2410.07170).

    X_l = the inputs of layer l on calibration data (tokens × in), centred;   X_l = U Σ Vᵀ
    A_l = V[:, :r_l]ᵀ  (the top right-singular vectors: the directions the layer's inputs vary most in),  B_l = 0

Ranks are redistributed by explained variance: every layer offers its top round(ρ·r) components with their
explained-variance ratios σ_i² / Σ σ²; the r × (number of layers) largest ratios over all layers win, and layer l
gets as many as it won (0 → the layer is left unadapted). With `adjust_scaling_factors` α is scaled by r_l / r so
that every layer keeps the scaling α / r.

PEFT computes the SVD with a randomised incremental PCA over batches until the components stop moving (cosine
≥ τ). splice computes it exactly in one pass from the running sums Σx and Σxxᵀ (the eigenvectors of the centred
scatter matrix are the right-singular vectors of the centred inputs), so there is no τ; where PEFT's PCA is exact
(one calibration batch and 2·round(ρ·r) ≥ in) the two agree (tests/adapters/test_inits.py). Components are signed
as PEFT signs them (each one's largest-magnitude entry positive). Layers that share an input (q/k/v) compete for
rank with equal ratios; ties go to the earlier layer.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters.config import doc
from splice.adapters.inits.calibrate import collect, rows, token_mask
from splice.errors import SpliceError


@dataclass
class EvaConfig:
    """EVA's options; names follow PEFT's `EvaConfig` (τ is not needed: splice's SVD is exact)."""

    rho: float = doc("Rank redistribution: a layer may get up to round(rho·r) (≥ 1; 1 = no redistribution).",
                     default=2.0)
    use_label_mask: bool = doc("Leave out positions whose label is -100 (prompt tokens).", default=True)
    whiten: bool = doc("Divide each component by the square root of its singular value.", default=False)
    adjust_scaling_factors: bool = doc("Scale lora_alpha by r_l / r so that every layer keeps the scaling α / r.",
                                       default=True)

    def __post_init__(self) -> None:
        if not float(self.rho) >= 1.0:
            raise SpliceError(f"eva_config.rho: must be >= 1, got {self.rho!r}")


@dataclass
class Components:
    """A layer's principal directions of input (rows, descending), their singular values and variance ratios."""

    vectors: Tensor  # (k, in)
    singular_values: Tensor  # (k,)
    ratios: Tensor  # (k,)


def principal_components(count: int, total: Tensor, gram: Tensor, k: int) -> Components:
    """Top-k principal directions of inputs with running sums `total` = Σx (in,) and `gram` = Σxxᵀ (in, in)."""
    mean = total / count
    scatter = gram - count * torch.outer(mean, mean)  # Σ (x − μ)(x − μ)ᵀ = Xcᵀ Xc
    values, vectors = torch.linalg.eigh(scatter)  # ascending
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)[:, :k].t()
    ratios = values / values.sum()
    # PEFT's sign convention (svd_flip on V): the largest-magnitude entry of every component is positive.
    signs = torch.sign(vectors.gather(1, vectors.abs().argmax(1, keepdim=True)))
    return Components((vectors * signs).float(), values[:k].sqrt().float(), ratios[:k].float())


def redistribute(ratios: dict[str, Tensor], budget: int) -> dict[str, int]:
    """Layer → rank: the `budget` largest explained-variance ratios over all layers, counted per layer."""
    names = [n for n, v in ratios.items() for _ in range(len(v))]
    pooled = torch.cat(list(ratios.values()))
    order = torch.sort(pooled, descending=True, stable=True).indices[:budget]
    ranks = dict.fromkeys(ratios, 0)
    for i in order.tolist():
        ranks[names[i]] += 1
    return ranks


def eva_starts(model: nn.Module, targets: dict[str, tuple[nn.Module, Tensor]], r: int, lora_alpha: float,
               eva: EvaConfig, batches: Iterable[Any], forward: Callable[[Any], Any]
               ) -> dict[str, tuple[int, float, Tensor]]:
    """Module name → (rank, lora_alpha, A (rank, in)) from the inputs of each target on `batches`.

    Args:
        targets: module name → (the module whose input is the layer input, its (out, in) weight).
    """
    sums: dict[str, list[Any]] = {}

    def observe(name: str, x: Tensor, batch: Any) -> None:
        x = rows(x, token_mask(batch, eva.use_label_mask)).double()
        acc = sums.setdefault(name, [0, 0.0, 0.0])
        acc[0] += x.shape[0]
        acc[1] = acc[1] + x.sum(0)
        acc[2] = acc[2] + x.t() @ x

    collect(model, {n: m for n, (m, _) in targets.items()}, batches, observe, forward)
    components = {}
    for name, (_, weight) in targets.items():
        if name not in sums or sums[name][0] < 2:
            raise SpliceError(f"eva: module {name!r} saw fewer than 2 calibration tokens; give more data")
        count, total, gram = sums[name]
        k = min(round(r * eva.rho), weight.shape[1], count)
        components[name] = principal_components(count, total, gram, k)
    ranks = redistribute({n: c.ratios for n, c in components.items()}, r * len(targets))
    out = {}
    for name, c in components.items():
        rank = ranks[name]
        A = c.vectors[:rank]
        if eva.whiten:
            sigma = c.singular_values[:rank]
            if bool((sigma <= 0).any()):  # a direction no calibration input varied along: whitening divides by 0
                raise SpliceError(f"eva: module {name!r} gets {rank} components but its inputs vary along only "
                                  f"{int((sigma > 0).sum())} directions; lower r or turn whiten off")
            A = A / sigma.sqrt()[:, None]
        alpha = lora_alpha * rank / r if eva.adjust_scaling_factors else lora_alpha
        out[name] = (rank, alpha, A)
    return out
