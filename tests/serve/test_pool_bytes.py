"""The pool's byte count of an adapter: tensors shared by several modules count once."""
from __future__ import annotations

import splice
from splice.serve.pool import adapter_nbytes


def test_shared_projections_count_once(tiny):
    model = tiny["bert"].build()
    splice.adapt(model, splice.VeraConfig(r=16, target_modules=["query", "value"]))
    layers = [m for m in model.modules() if hasattr(m, "adapters") and "default" in m.adapters]
    own = sum(p.nbytes for m in layers for p in m.adapters["default"].parameters(recurse=False))
    projections = layers[0].adapters["default"].projections
    shared = projections.A.nbytes + projections.B.nbytes
    assert len(layers) == 4 and adapter_nbytes(model, "default") == own + shared


def test_plain_lora_counts_every_factor(tiny):
    model = tiny["bert"].build()
    splice.adapt(model, splice.LoraConfig(r=4, target_modules=["query", "value"]))
    expected = sum(p.nbytes for p in splice.trainable_parameters(model))
    assert adapter_nbytes(model, "default") == expected
