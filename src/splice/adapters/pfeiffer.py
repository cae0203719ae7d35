"""Pfeiffer adapters (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
https://arxiv.org/abs/2005.00247).

The same residual bottleneck as Houlsby's (houlsby.py has the layer and the math), placed once per block, after
the feed-forward output projection only:

    y = h + W_up f(W_down h + b_down) + b_up          h = the FFN output projection's output (width d)

Trainable parameters per wrapped module: 2·d·m + d + m; half the modules of Houlsby's placement.

Defaults follow the paper's configuration (adapter-hub's `SeqBnConfig`): reduction factor 16, ReLU. One difference
from the paper: its adapter reads the block's output after the residual add and the (pre-trained) layer norm and
then re-applies that layer norm; splice wraps a module and adds to its output, so the adapter here reads the FFN
projection's output before the residual add, like Houlsby's second adapter. Not a weight delta: merge, get_delta,
apply and compress refuse it with one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from splice.adapters.config import doc
from splice.adapters.houlsby import ACTIVATIONS, HoulsbyAdapter, HoulsbyConfig
from splice.adapters.registry import register

# The feed-forward output projection of every block (BERT's `layer.<i>.output.dense`, not its attention output).
PFEIFFER_TARGETS = r"(.*\.)?(layer\.\d+\.output\.dense|down_proj|mlp\.c_proj)"


@dataclass
class PfeifferConfig(HoulsbyConfig):
    """Houlsby's fields with the paper's placement (feed-forward output only) and non-linearity (ReLU)."""

    target_modules: list[str] | str = doc(
        "Projections whose output gets a bottleneck: name suffixes, one regex, or 'all-linear'. The default is "
        "every block's feed-forward output projection (BERT, Llama-style and GPT-2 names).",
        default=PFEIFFER_TARGETS)
    non_linearity: str = doc(f"The bottleneck's non-linearity f: {', '.join(ACTIVATIONS)}.", default="relu")

    params_formula: ClassVar[str] = "2·out·m + out + m (m = bottleneck_size or out // reduction_factor)"


@register("pfeiffer", config=PfeifferConfig, reference="https://arxiv.org/abs/2005.00247")
class PfeifferAdapter(HoulsbyAdapter):
    """One Pfeiffer bottleneck: Houlsby's layer, registered under its own name."""
