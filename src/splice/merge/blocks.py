"""Large tensors merged in row blocks: memory O(block) instead of O(inputs × tensor), and every pass in cache.

A method opts in with `merge_method(..., blocks=...)`: a function that takes a `BlockSource` and yields
(rows, merged rows). It may first make statistics passes over each model's blocks (TIES's magnitude cut, DARE's L1
norms), so the result is that of the whole-tensor function (see sparsify_blocks.py for what may differ: float
rounding of per-tensor sums, never a mask). `elementwise(fn)` makes the blocked form of a method that is elementwise,
by calling the whole-tensor function on each block.

Blocks are read from the memory-mapped inputs on demand, so a pass costs a read of the mapped pages (from the page
cache after the first) and a conversion to float32, and no float copy of the tensor stays in memory between passes;
random sparsifiers (DARE, DELLA) keep their drawn masks, one byte an entry per model, for the emitting pass.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor

BLOCK_ELEMENTS = 1 << 19  # ~2 MB of float32 per model: the working set of a pass stays in cache
MIN_ELEMENTS = 1 << 22  # smaller tensors are merged whole (one pass is cheaper than several)


class BlockSource:
    """The inputs of one output tensor, row block by row block, in the method's working dtype.

    Args:
        base: the base tensor (memory-mapped), or None.
        inputs: the models' tensors (memory-mapped), in the method's order.
        prepare: turns a slice of a mapped tensor into a private float32 block (rounding, NaN/inf check); gets
            the slice and the index of the input (-1 for the base).
        deltas: hand out θ_i − base (delta-space methods) rather than θ_i.
        block_elements: entries per block (whole rows; at least one row).
    """

    def __init__(self, base: Tensor | None, inputs: list[Tensor], prepare: Callable[[Tensor, int], Tensor], *,
                 deltas: bool, block_elements: int | None = None) -> None:
        self.base, self.inputs, self.prepare, self.deltas = base, inputs, prepare, deltas
        first = inputs[0] if inputs else base
        assert first is not None and first.dim() >= 2
        self.shape, self.numel = first.shape, first.numel()
        rows = max(1, (block_elements or BLOCK_ELEMENTS) // max(1, first[0].numel()))
        self.spans = [slice(r, min(r + rows, first.shape[0])) for r in range(0, first.shape[0], rows)]
        self._base_rows: tuple[slice, Tensor | None] | None = None

    @property
    def count(self) -> int:
        return len(self.inputs)

    def base_block(self, rows: slice) -> Tensor | None:
        """The base's rows (cached for the block being emitted)."""
        if self.base is None:
            return None
        if self._base_rows is None or self._base_rows[0] != rows:
            self._base_rows = (rows, self.prepare(self.base[rows], -1))
        return self._base_rows[1]

    def _block(self, i: int, rows: slice) -> Tensor:
        t = self.prepare(self.inputs[i][rows], i)
        if self.deltas:
            base = self.base_block(rows)
            assert base is not None
            t.sub_(base)
        return t

    def model_blocks(self, i: int) -> Iterator[Tensor]:
        """One pass over model `i`'s blocks (a statistics pass)."""
        for rows in self.spans:
            yield self._block(i, rows)

    def blocks(self) -> Iterator[tuple[slice, list[Tensor]]]:
        """The emitting pass: every model's block of each row span."""
        for rows in self.spans:
            yield rows, [self._block(i, rows) for i in range(self.count)]


def elementwise(fn: Callable[..., Tensor]) -> Callable[..., Iterator[tuple[slice, Tensor]]]:
    """The blocked form of an elementwise method: `fn` on each block (bit for bit the whole tensor's result)."""

    def blocks(source: BlockSource, *, ctx: Any = None, **params: Any) -> Iterator[tuple[slice, Tensor]]:
        for rows, tensors in source.blocks():
            yield rows, fn(source.base_block(rows), tensors, ctx=ctx, **params)

    return blocks
