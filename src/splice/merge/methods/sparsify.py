"""Sparsification of one task vector τ = θ_ft − θ_0: the `sparsify` knob of generalized task arithmetic.

Not a merge method (it registers nothing); `generalized.py` applies one of these to every delta before weighting and
sign consensus. Each keeps a subset of entries, m ⊙ τ with a 0/1 mask m, and optionally rescales the survivors so the
L1 norm is unchanged (mergekit's ``rescale``):

    rescale(τ, m) = (m ⊙ τ) · ‖τ‖₁ / ‖m ⊙ τ‖₁          (left unscaled when either norm is < 1e-7)

mergekit uses this L1 form, and so do we. For DARE it is ≈ 1/density, the paper's 1/(1 − p); for DELLA it is one
factor per tensor (≈ ‖τ‖₁ / Σ p_i|τ_i|) where the paper divides each survivor by its own keep probability p_i.

- ``magnitude`` (TIES, https://arxiv.org/abs/2306.01708): keep the k = max(1, ⌊density·n⌋) largest |τ|.
- ``random`` (DARE, https://arxiv.org/abs/2311.03099): m_i ~ Bernoulli(density).
- ``magnitude_outliers`` (Model Breadcrumbs, https://arxiv.org/abs/2312.06795): drop the ⌊gamma·n⌋ largest |τ|
  and then the smallest, keeping ⌊density·n⌋ in between.
- ``rank_magnitude_sampling`` (DELLA's MAGPRUNE, https://arxiv.org/abs/2406.11617): m_i ~ Bernoulli(p_i) with
  p_i = density − ε + 2ε · (r_i − 1)/(n_row − 1), r_i the magnitude rank of entry i within its row.

Numerics follow mergekit 0.1.5 (``mergekit/sparsify.py``): the same float32 work dtype on CPU and DELLA's ranks taken
along dim 1 of a ≥2-D tensor (a 1-D tensor is one row). Random masks are drawn as m_i = [u_i < p_i] with u_i from
one ``torch.rand`` per tensor: Bernoulli(p_i) exactly as ``torch.bernoulli`` is, at a third of its cost on CPU
(it takes one generator call per entry, serially), which is most of DARE's time. The stream differs from
mergekit's, so masks are equal in law, not draw for draw; ``MASK_DRAW = "bernoulli"`` draws with
``torch.bernoulli`` as mergekit does, and with a generator seeded like torch's global one gives its exact masks
(the parity tests use it to pin every other step of DARE and DELLA to mergekit's). One deliberate difference: mergekit ranks by a
full ``argsort``, whose order among equal magnitudes is unspecified (on large tensors it is neither index order nor
stable), so where entries tie at the cut its choice is arbitrary. Here the cut is found by selection (a radix select
on the float bits, O(n), ~10× faster than sorting a 32M-entry tensor) and ties at the cut are kept in index order:
the same masks wherever magnitudes do not tie at the cut, and a reproducible one where they do (low-precision deltas,
e.g. bfloat16, tie often).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from splice.errors import SpliceError

SparsifyMethod = Literal["none", "magnitude", "random", "magnitude_outliers", "rank_magnitude_sampling"]
SPARSIFY_METHODS: tuple[str, ...] = ("none", "magnitude", "random", "magnitude_outliers", "rank_magnitude_sampling")


def rescaled(tensor: Tensor, mask: Tensor, rescale: bool, eps: float = 1e-7) -> Tensor:
    """`mask ⊙ tensor`, scaled to keep ‖tensor‖₁ when `rescale` (unless either L1 norm is below `eps`)."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _cpu_float(w: Tensor) -> Tensor:
    # Sorting half-precision magnitudes on CPU is slow and coarse; mergekit sorts them in float32 there.
    return w.float() if w.device.type == "cpu" else w


def _kth_largest_float32(values: Tensor, k: int) -> Tensor:
    """The k-th largest of flat, finite, non-negative float32 `values`, by a two-pass radix select on the bits.

    Non-negative IEEE floats order like their bit patterns read as integers, so two histograms (the high 16 bits,
    then the low 16 bits inside the one high bucket that holds the k-th value) find it exactly: O(n) with small
    constants, ~2.5× faster than torch.kthvalue's selection on a 32M-entry tensor.
    """
    bits = values.view(torch.int32)
    high = bits >> 16
    from_top = torch.bincount(high, minlength=1 << 15).flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, k))
    bucket = (1 << 15) - 1 - i
    above = int(from_top[i - 1]) if i else 0
    low = bits[high == bucket] & 0xFFFF
    j = int(torch.searchsorted(torch.bincount(low, minlength=1 << 16).flip(0).cumsum(0), k - above))
    return torch.tensor((bucket << 16) | ((1 << 16) - 1 - j), dtype=torch.int32).view(torch.float32)


def largest_mask(values: Tensor, k: int) -> Tensor:
    """A 0/1 mask (dtype of `values`, flat) of the `k` largest entries of flat, non-negative `values`; ties at the
    cut are kept in index order."""
    n = values.numel()
    if k >= n:
        return torch.ones_like(values)
    if k <= 0:
        return torch.zeros_like(values)
    if values.dtype == torch.float32 and values.device.type == "cpu" and n >= 1 << 20:
        cut = _kth_largest_float32(values, k)
    else:
        cut = torch.kthvalue(values, n - k + 1).values
    keep = values > cut
    # count_nonzero: a bool .sum() accumulates in int64 and is ~30× slower on CPU.
    need = k - int(torch.count_nonzero(keep))
    if need:
        tied = values == cut
        if int(torch.count_nonzero(tied)) == need:
            keep |= tied
        else:
            keep[tied.nonzero().squeeze(1)[:need]] = True
    return keep.to(values.dtype)


def magnitude(tensor: Tensor, density: float, rescale: bool = False) -> Tensor:
    """TIES trimming: keep the k = max(1, int(density·n)) entries of largest magnitude (any positive density keeps
    one). int() of the float product, as mergekit computes it: 0.29·100 = 28.999… keeps 28, and the merges stay
    bit-identical to mergekit's."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = largest_mask(_cpu_float(tensor.abs().reshape(-1)), k).to(tensor.dtype)
    return rescaled(tensor, mask.reshape_as(tensor), rescale)


def magnitude_outliers(tensor: Tensor, density: float, gamma: float = 0.01, rescale: bool = False) -> Tensor:
    """Breadcrumbs: drop the ⌊gamma·n⌋ largest-magnitude outliers and the smallest, keeping ⌊density·n⌋ in between.

    When density + gamma > 1 the outlier cut shrinks so that ⌊density·n⌋ entries are still kept.
    """
    if density >= 1:
        return tensor
    n = tensor.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep - n_top)
    magnitudes = _cpu_float(tensor.abs().reshape(-1))
    # The kept band is "the largest n − n_bottom" minus "the largest n − n_bottom − keep" (ties at a cut by index).
    mask = largest_mask(magnitudes, n - n_bottom) - largest_mask(magnitudes, n - n_bottom - keep)
    return rescaled(tensor, mask.clamp(min=0).to(tensor.dtype).reshape_as(tensor), rescale)


def _draw_dtype(tensor: Tensor) -> torch.dtype:
    # torch.bernoulli has no float16 CPU kernel: draw in float32 there (bfloat16 and accelerators keep their dtype).
    return tensor.dtype if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16 else torch.float32


MASK_DRAW: Literal["uniform", "bernoulli"] = "uniform"  # see the module docstring


def draw_mask(probs: Tensor | float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A 0/1 mask (dtype and shape of `like`) with entry i kept with probability probs_i (a tensor shaped like
    `like`, or one float for all); consumes the generator entry by entry in order, so row blocks of a tensor drawn
    one after the other give the whole tensor's mask."""
    if MASK_DRAW == "bernoulli":
        p = torch.full_like(like, probs) if isinstance(probs, float) else probs
        return torch.bernoulli(p, generator=generator)
    u = torch.rand(like.shape, generator=generator, dtype=torch.float32, device=like.device)
    return (u < probs).to(like.dtype)


def random(tensor: Tensor, density: float, rescale: bool = False,
           generator: torch.Generator | None = None) -> Tensor:
    """DARE: keep each entry independently with probability `density` (drop rate p = 1 − density)."""
    if density >= 1:
        return tensor
    dtype = _draw_dtype(tensor)
    mask = draw_mask(float(density), torch.empty(tensor.shape, dtype=dtype, device=tensor.device), generator)
    return rescaled(tensor.to(dtype), mask, rescale).to(tensor.dtype)


def check_epsilon(density: float, epsilon: float) -> None:
    """DELLA's keep probabilities density ± epsilon must lie inside (0, 1)."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise SpliceError(f"parameter 'epsilon' must keep density ± epsilon inside (0, 1), "
                          f"got density={density}, epsilon={epsilon}")


def rank_probabilities(rows: Tensor, density: float, epsilon: float, dtype: torch.dtype) -> Tensor:
    """MAGPRUNE's keep probability of each entry of `rows` (R, C, ...), by its magnitude rank within its row."""
    order = torch.argsort(rows.abs(), dim=1)
    # The ranks along a row are a permutation of 1..C, so (rank − min) / (max − min) is (j − 1) / (C − 1) for the
    # j-th smallest: each position's probability is computed once (same float operations, same bits as computing
    # it from the ranks) and scattered to the entry holding that rank (the inverse permutation, without a 2nd sort).
    return torch.empty(order.shape, dtype=dtype).scatter_(1, order, rank_ladder(rows.shape, density, epsilon, dtype)
                                                          .expand_as(order).contiguous())


def rank_ladder(shape: torch.Size, density: float, epsilon: float, dtype: torch.dtype) -> Tensor:
    """The keep probability of the j-th smallest entry of a row of shape[1] entries, shaped to broadcast over rows."""
    c = shape[1]
    j = torch.arange(c, dtype=dtype)
    # A row of one entry has no rank spread (mergekit divides 0/0 there and fails); give it the middle probability.
    rank01 = (j / (c - 1)).clamp(0, 1) if c > 1 else torch.full((1,), 0.5, dtype=dtype)
    return ((density - epsilon) + rank01 * 2 * epsilon).view(1, -1, *[1] * (len(shape) - 2))


def rank_magnitude_sampling(tensor: Tensor, density: float, epsilon: float, rescale: bool = False,
                            generator: torch.Generator | None = None) -> Tensor:
    """DELLA's MAGPRUNE: keep probability rises linearly with magnitude rank, from density − ε to density + ε.

    Ranks are taken within each row (along dim 1; a 1-D tensor is one row), as in mergekit.
    """
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    check_epsilon(density, epsilon)
    shape = tensor.shape
    dtype = _draw_dtype(tensor)
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor  # (R, C, ...)
    mask = torch.empty(rows.shape, dtype=dtype, device=rows.device)
    # Rows are ranked independently and the draw consumes the generator element by element in order, so blocks of
    # rows give the same masks as the whole tensor at once, without its int64 sort indices and float
    # rank/probability temporaries (several times the tensor's size on a 65M-entry embedding).
    step = max(1, (1 << 22) // max(1, rows[0].numel()))
    for r0 in range(0, rows.shape[0], step):
        probs = rank_probabilities(rows[r0:r0 + step], density, epsilon, dtype)
        mask[r0:r0 + step] = draw_mask(probs, probs, generator)
    return rescaled(rows.to(dtype), mask, rescale).to(tensor.dtype).reshape(shape)


def sparsify(tensor: Tensor, method: SparsifyMethod | str, density: float, *, gamma: float = 0.01, epsilon: float = 0.15,
             rescale: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Apply sparsification `method` (one of SPARSIFY_METHODS) to one task vector."""
    if method == "none":
        return tensor
    if method == "magnitude":
        return magnitude(tensor, density, rescale)
    if method == "random":
        return random(tensor, density, rescale, generator)
    if method == "magnitude_outliers":
        return magnitude_outliers(tensor, density, gamma, rescale)
    if method == "rank_magnitude_sampling":
        return rank_magnitude_sampling(tensor, density, epsilon, rescale, generator)
    raise SpliceError(f"parameter 'sparsify' must be one of {', '.join(SPARSIFY_METHODS)}, got {method!r}")
