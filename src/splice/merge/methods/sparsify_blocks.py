"""The `sparsify` knob (sparsify.py) for a task vector seen in row blocks rather than whole.

A large tensor (an embedding of 65M entries) merged whole needs several float32 copies of it per model; merged in row
blocks, memory is O(block) and every pass runs in cache. What is not elementwise in sparsification is a handful of
per-tensor numbers, gathered in statistics passes over the blocks before any block is emitted:

- ``magnitude`` / ``magnitude_outliers``: the k-th largest magnitude, by the same two-level radix select as
  `sparsify._kth_largest_float32` (the histograms add up over blocks), and how many entries tied at the cut are kept
  (the first ones in index order, as in `sparsify.largest_mask`);
- ``random`` / ``rank_magnitude_sampling``: the masks themselves, drawn block by block in row order, which gives the
  very masks of the whole-tensor version (the draw consumes the generator element by element, in order), kept
  as one byte an entry until the emitting pass; and the two L1 norms of ``rescale``.

Masks are identical to the whole-tensor functions'. The one numerical difference is the L1 rescale factor, summed
block by block in float64 rather than in one float32 reduction: a relative difference of order 1e-7.
Blocks are rows of a ≥2-D float32 tensor (DELLA ranks within rows, so a block must hold whole rows).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from splice.merge.methods.sparsify import _draw_dtype, check_epsilon, draw_mask, rank_probabilities

Blocks = Callable[[], Iterator[Tensor]]  # a fresh pass over one model's float32 task-vector blocks, in row order

_HIGH, _LOW = 1 << 15, 1 << 16


class _Cut:
    """Keep the k largest of n non-negative float32 values seen block by block (ties at the cut: first by index)."""

    def __init__(self, k: int, n: int) -> None:
        self.k, self.n = k, n
        self.cut = torch.tensor(0.0)
        self.ties = 0  # entries equal to the cut to keep, in index order
        self.left = 0  # of those, not yet given out in this pass

    @property
    def trivial(self) -> bool:
        return self.k <= 0 or self.k >= self.n

    def start(self) -> None:
        self.left = self.ties

    def mask(self, values: Tensor) -> Tensor:
        """The bool keep-mask of one block; call `start` before each pass over the blocks, in row order."""
        if self.k >= self.n:
            return torch.ones_like(values, dtype=torch.bool)
        if self.k <= 0:
            return torch.zeros_like(values, dtype=torch.bool)
        keep = values > self.cut
        if self.left > 0:
            tied = (values == self.cut).reshape(-1).nonzero().squeeze(1)[:self.left]
            keep.view(-1)[tied] = True
            self.left -= tied.numel()
        return keep


def find_cuts(blocks: Blocks, cuts: list[_Cut]) -> None:
    """Set `cut` and `ties` of each of `cuts` (on |block|) with two passes over `blocks`."""
    todo = [c for c in cuts if not c.trivial]
    if not todo:
        return
    high = torch.zeros(_HIGH, dtype=torch.int64)
    for block in blocks():
        high += torch.bincount(block.abs().view(torch.int32).reshape(-1) >> 16, minlength=_HIGH)
    from_top = high.flip(0).cumsum(0)
    found = []
    for c in todo:
        i = int(torch.searchsorted(from_top, c.k))
        found.append((_HIGH - 1 - i, int(from_top[i - 1]) if i else 0))
    buckets = sorted({b for b, _ in found})
    low = {b: torch.zeros(_LOW, dtype=torch.int64) for b in buckets}
    for block in blocks():
        bits = block.abs().view(torch.int32).reshape(-1)
        top = bits >> 16
        for b in buckets:
            low[b] += torch.bincount(bits[top == b] & 0xFFFF, minlength=_LOW)
    for c, (bucket, above) in zip(todo, found):
        low_from_top = low[bucket].flip(0).cumsum(0)
        j = int(torch.searchsorted(low_from_top, c.k - above))
        c.cut = torch.tensor((bucket << 16) | (_LOW - 1 - j), dtype=torch.int32).view(torch.float32)
        c.ties = c.k - above - (int(low_from_top[j - 1]) if j else 0)


class BlockSparsifier:
    """One model's sparsification, block by block: `prepare` runs the statistics passes, then `apply` is called
    once per block, in row order. The generator is shared by every model, in model order, like the whole version's."""

    def __init__(self, method: str, density: float, *, n: int, gamma: float = 0.01, epsilon: float = 0.15,
                 rescale: bool = False) -> None:
        self.method, self.density, self.n = method, density, n
        self.gamma, self.epsilon, self.rescale = gamma, epsilon, rescale
        self.cuts: list[_Cut] = []
        self.factor: Tensor | None = None  # the L1 rescale factor (float32), when rescaling applies
        self.masks: list[Tensor] = []  # random methods: each block's drawn keep-mask, in row order
        if method == "rank_magnitude_sampling" and 0 < density < 1:
            check_epsilon(density, epsilon)

    @property
    def identity(self) -> bool:
        return self.method == "none" or self.density >= 1

    @property
    def empty(self) -> bool:
        # The whole-tensor functions return zeros here (magnitude keeps one entry at any positive density).
        return self.method in ("magnitude", "rank_magnitude_sampling") and self.density <= 0

    def prepare(self, blocks: Blocks, generator: torch.Generator | None) -> None:
        if self.identity or self.empty:
            return
        if self.method in ("magnitude", "magnitude_outliers"):
            if self.method == "magnitude":
                self.cuts = [_Cut(max(1, int(self.density * self.n)), self.n)]
            else:
                keep = int(self.density * self.n)
                n_bottom = max(0, self.n - keep - int(self.gamma * self.n))
                self.cuts = [_Cut(self.n - n_bottom, self.n), _Cut(self.n - n_bottom - keep, self.n)]
            find_cuts(blocks, self.cuts)
            if self.rescale:
                self._rescale_factor(blocks, self._mask)
            return
        # Random methods: draw this model's masks now, in the whole version's order (the shared generator must end
        # where the whole version leaves it for the next model), and keep them, one byte an entry, for the
        # emitting pass: drawing them again would cost DELLA a second sort of every row.
        assert generator is not None, "random sparsification needs the merge's generator"

        def draw(block: Tensor) -> Tensor:
            mask = self._draw(block, generator).to(torch.bool)
            self.masks.append(mask)
            return mask

        if self.rescale:
            self._rescale_factor(blocks, draw)
        else:
            for block in blocks():
                draw(block)

    def _rescale_factor(self, blocks: Blocks, mask: Callable[[Tensor], Tensor]) -> None:
        before = after = 0.0
        for c in self.cuts:
            c.start()
        for block in blocks():
            before += float(block.abs().sum(dtype=torch.float64))
            after += float((block * mask(block)).abs().sum(dtype=torch.float64))
        # float32 norms, as the whole version compares them with its 1e-7 threshold and divides them.
        b32, a32 = torch.tensor(before, dtype=torch.float32), torch.tensor(after, dtype=torch.float32)
        self.factor = None if b32 < 1e-7 or a32 < 1e-7 else b32 / a32

    def _mask(self, block: Tensor) -> Tensor:
        values = block.abs()
        if self.method == "magnitude":
            return self.cuts[0].mask(values).to(block.dtype)
        # Breadcrumbs keeps the band between its two cuts.
        return (self.cuts[0].mask(values) & ~self.cuts[1].mask(values)).to(block.dtype)

    def _draw(self, block: Tensor, generator: torch.Generator) -> Tensor:
        dtype = _draw_dtype(block)
        if self.method == "random":
            return draw_mask(float(self.density), torch.empty(block.shape, dtype=dtype), generator)
        probs = rank_probabilities(block, self.density, self.epsilon, dtype)
        return draw_mask(probs, probs, generator)

    def begin(self) -> None:
        """Start the emitting pass (after `prepare`)."""
        for c in self.cuts:
            c.start()

    def apply(self, block: Tensor) -> Tensor:
        """The sparsified (and rescaled) block: the same entries as the whole-tensor function keeps."""
        if self.identity:
            return block
        if self.empty:
            return torch.zeros_like(block)
        if self.cuts:
            mask = self._mask(block)
        else:
            mask = self.masks.pop(0)
        masked = block * mask
        return masked * self.factor if self.factor is not None else masked
