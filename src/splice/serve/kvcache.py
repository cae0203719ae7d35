"""The running batch's key/value cache: rows joined, dropped and re-ordered between decoding steps.

Rows of a batch have different lengths, so the cache is *left*-padded: every row's last real token sits in the
last column, and a 0/1 attention mask (rows, columns) says which columns are real. A new group of rows is merged in
by padding the shorter of the two caches on the left and concatenating rows (the pad-and-concat scheme of TGI's
first continuous batcher); a finished row is dropped with one `index_select`, and columns that became padding for
every remaining row are cut off. All of this touches the cache only when rows join or leave, never per token.

Tensors per layer: keys and values (rows, kv_heads, columns, head_dim).
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache


def new_cache() -> DynamicCache:
    return DynamicCache()


def _layers(cache: DynamicCache) -> list:
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", False)]


def _pad_left(t: Tensor, columns: int, dim: int) -> Tensor:
    if columns == 0:
        return t
    shape = list(t.shape)
    shape[dim] = columns
    return torch.cat([t.new_zeros(shape), t], dim)


def concat(a: DynamicCache, mask_a: Tensor, b: DynamicCache, mask_b: Tensor) -> tuple[DynamicCache, Tensor]:
    """Rows of `a` then rows of `b` in one cache (left-padded to the longer one) and the joint mask."""
    width = max(mask_a.shape[1], mask_b.shape[1])
    pa, pb = width - mask_a.shape[1], width - mask_b.shape[1]
    for la, lb in zip(_layers(a), _layers(b), strict=True):
        la.keys = torch.cat([_pad_left(la.keys, pa, 2), _pad_left(lb.keys, pb, 2)], 0)
        la.values = torch.cat([_pad_left(la.values, pa, 2), _pad_left(lb.values, pb, 2)], 0)
    return a, torch.cat([_pad_left(mask_a, pa, 1), _pad_left(mask_b, pb, 1)], 0)


def select(cache: DynamicCache, mask: Tensor, rows: Tensor) -> tuple[DynamicCache, Tensor]:
    """Keep `rows` (in that order), then cut the left columns that are padding in every kept row."""
    mask = mask.index_select(0, rows.to(mask.device))
    real = mask.any(0).nonzero()
    start = int(real[0]) if len(real) else mask.shape[1]
    for layer in _layers(cache):
        rows = rows.to(layer.keys.device)  # the mask (and so `rows`) lives on the CPU; a CUDA cache needs its own
        layer.keys = layer.keys.index_select(0, rows)[:, :, start:]
        layer.values = layer.values.index_select(0, rows)[:, :, start:]
    return cache, mask[:, start:]


def nbytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in _layers(cache))
