"""The delta of a fine-tune: per-tensor forms and the `DeltaSet` that collects them."""
from splice.delta.deltaset import (DeltaSet, GroupedLazyDeltaSet, LazyDiffDeltaSet, fingerprints_match,
                                   tensor_fingerprint)
from splice.delta.forms import FORMS, Delta, Dense, Kron, LowRank, Scale, Sparse

__all__ = [
    "Delta", "Dense", "LowRank", "Sparse", "Scale", "Kron", "FORMS", "DeltaSet", "LazyDiffDeltaSet",
    "GroupedLazyDeltaSet",
    "tensor_fingerprint", "fingerprints_match",
]
