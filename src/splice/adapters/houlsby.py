"""Houlsby bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
https://arxiv.org/abs/1902.00751).

A small residual bottleneck on the output h = W₀x + b of a projection (d = out of the wrapped module):

        x ──► W₀, b (frozen) ──► h ──────────────────────────────────────┐
                                 │                                      (+) ──► y
                                 └──► W_down (m×d) ──► f ──► W_up (d×m) ──┘

        y = h + W_up f(W_down h + b_down) + b_up

The paper puts one after the attention output projection and one after the feed-forward output projection of every
block, before the residual add and layer norm; that is the default `target_modules` here (BERT's
`attention.output.dense` and `layer.N.output.dense`, Llama's `o_proj` / `down_proj`, GPT-2's `attn.c_proj` /
`mlp.c_proj`). In splice's wrapper design the adapter sits on that projection and reads its *output*:
`contribution(x, h, base) = W_up f(W_down h)`.

The update is not a weight delta (f is non-linear): `delta()` returns None, and merge / get_delta / `splice apply`
/ `splice compress` / `splice merge` refuse it with one line (`HoulsbyConfig.has_delta = False`). Serve or train it
as it is; mixed batches work (each group's bottleneck runs on that group's base rows). Several active adapters on
one module each read the base output h and add their changes (the wrapper's rule for every method), rather than
running one after the other as adapter-hub's `Stack` does; a single adapter is the paper's.

Trainable parameters per wrapped module: 2·d·m + d + m (two weight matrices and their biases).

Choices where the paper leaves room (each an option):
- bottleneck m = d // reduction_factor, reduction_factor 16 (adapter-hub's default for this architecture; the paper
  sweeps m ∈ {8, 64, 256}), or `bottleneck_size` directly;
- non-linearity GELU, as the authors' code (google-research/adapter-bert) uses; relu, gelu_new (tanh
  approximation), swish/silu and tanh are options;
- init "identity" (default): W_down as nn.Linear's own init (Kaiming-uniform), W_up = 0 and both biases 0, so the
  model equals the base exactly at init and W_up learns first, as LoRA's B does (adapter-hub's "mam_adapter" init).
  "near_identity" is the paper's: both weights from a normal with std 1e-2 truncated at two std, biases 0;
- dropout on the adapter's output (training only), default 0;
- the paper also trains every layer norm; that is `modules_to_save=["LayerNorm"]` (BERT's names), not a default.

Pfeiffer adapters (pfeiffer.py) and Compacter (compacter.py) reuse this layer.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.lora import module_dims
from splice.adapters.registry import register
from splice.errors import SpliceError, closest

KINDS = ("linear", "conv1d")
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "gelu_new": lambda t: F.gelu(t, approximate="tanh"), "swish": F.silu,
    "silu": F.silu, "tanh": torch.tanh}
INITS = ("identity", "near_identity")
# After each block's attention output projection and its feed-forward output projection. A regex on the full
# module name: the suffix "output.dense" alone would also match BERT's attention output, so the FFN's is
# `layer.<i>.output.dense`.
HOULSBY_TARGETS = (r"(.*\.)?(attention\.output\.dense|layer\.\d+\.output\.dense|o_proj|down_proj|attn\.c_proj"
                   r"|mlp\.c_proj)")


@dataclass
class HoulsbyConfig(AdapterConfig):
    """Bottleneck adapter hyper-parameters (adapter-hub's names where it has them)."""

    target_modules: list[str] | str = doc(
        "Projections whose output gets a bottleneck: name suffixes, one regex, or 'all-linear'. The default is "
        "every block's attention output and feed-forward output projection (BERT, Llama-style and GPT-2 names).",
        default=HOULSBY_TARGETS)
    reduction_factor: float = doc("Bottleneck size m = d // reduction_factor for a module of output width d.",
                                  default=16.0)
    bottleneck_size: int | None = doc("The bottleneck size m itself (overrides reduction_factor).", default=None)
    non_linearity: str = doc(f"The bottleneck's non-linearity f: {', '.join(ACTIVATIONS)}.", default="gelu")
    init_weights: str = doc("'identity': W_up = 0, so the model starts as the base (default); 'near_identity': the "
                            "paper's truncated normal (std 1e-2) on both weights.", default="identity")
    dropout: float = doc("Dropout on the adapter's output (training only).", default=0.0)

    has_delta: ClassVar[bool] = False
    params_formula: ClassVar[str] = "2·out·m + out + m (m = bottleneck_size or out // reduction_factor)"

    def __post_init__(self) -> None:
        super().__post_init__()
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not math.isfinite(rf) or rf <= 0:
            raise SpliceError(f"reduction_factor: must be a positive number, got {rf!r}")
        self.reduction_factor = float(rf)
        m = self.bottleneck_size
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise SpliceError(f"bottleneck_size: must be a positive integer or null, got {m!r}")
        if self.non_linearity not in ACTIVATIONS:
            hint = closest(str(self.non_linearity), ACTIVATIONS)
            raise SpliceError(f"non_linearity: unknown {self.non_linearity!r}{hint}; choose one of "
                              f"{', '.join(ACTIVATIONS)}")
        if self.init_weights not in INITS:
            hint = closest(str(self.init_weights), INITS)
            raise SpliceError(f"init_weights: unknown {self.init_weights!r}{hint}; choose one of {', '.join(INITS)}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise SpliceError(f"dropout: must be in [0, 1), got {self.dropout!r}")

    def for_target(self, name: str) -> "HoulsbyConfig":
        config = copy.copy(self)
        config.target_name = name  # not a field: names the module in messages, never saved
        return config

    def bottleneck(self, base: nn.Module, kind: str) -> tuple[int, int]:
        """(d, m): the wrapped module's output width and the bottleneck size, or one line saying why not."""
        where = f"module {getattr(self, 'target_name', type(base).__name__)!r}"
        if kind not in KINDS:
            raise SpliceError(f"{self.method} cannot wrap {type(base).__name__} ({where}); it wraps nn.Linear and "
                              "HF Conv1D")
        d = module_dims(base, kind)[1]
        m = self.bottleneck_size or int(d // self.reduction_factor)
        if m < 1:
            raise SpliceError(f"reduction_factor: {self.reduction_factor:g} is larger than the width {d} of {where} "
                              f"(bottleneck {d} // {self.reduction_factor:g} = 0); lower it or set bottleneck_size")
        return d, m


def _floating(like: Tensor) -> tuple[torch.device, torch.dtype]:
    return like.device, like.dtype if like.is_floating_point() else torch.float32


@register("houlsby", config=HoulsbyConfig, reference="https://arxiv.org/abs/1902.00751")
class HoulsbyAdapter(nn.Module):
    """One bottleneck on the output of one projection. Subclasses change how the two projections are made
    (`build`, `projections`): Compacter's are Kronecker sums."""

    peft_keys: ClassVar[tuple[str, ...]] = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight",
                                            "adapter_up.bias")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: HoulsbyConfig) -> dict[str, tuple[int, ...]]:
        d, m = config.bottleneck(base, kind)
        return {"adapter_down.weight": (m, d), "adapter_down.bias": (m,), "adapter_up.weight": (d, m),
                "adapter_up.bias": (d,)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        missing = [k for k in cls.peft_keys if k not in tensors]
        return f"expected {', '.join(missing)}" if missing else None

    def __init__(self, base: nn.Module, kind: str, config: HoulsbyConfig):
        super().__init__()
        d, m = config.bottleneck(base, kind)
        self.activation = config.non_linearity
        self.dropout = float(config.dropout)
        self.build(d, m, config, base.weight)

    def build(self, d: int, m: int, config: HoulsbyConfig, like: Tensor) -> None:
        """Make the down (d → m) and up (m → d) projections, initialised per `config.init_weights`."""
        dev, dt = _floating(like)
        self.adapter_down = nn.Linear(d, m, device=dev, dtype=dt)  # nn.Linear's Kaiming-uniform init
        self.adapter_up = nn.Linear(m, d, device=dev, dtype=dt)
        with torch.no_grad():
            if config.init_weights == "near_identity":
                for w in (self.adapter_down.weight, self.adapter_up.weight):
                    nn.init.trunc_normal_(w, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
            else:
                self.adapter_up.weight.zero_()
            self.adapter_down.bias.zero_()
            self.adapter_up.bias.zero_()

    def projections(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(W_down (m, d), b_down (m), W_up (d, m), b_up (d))."""
        return self.adapter_down.weight, self.adapter_down.bias, self.adapter_up.weight, self.adapter_up.bias

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        W_down, b_down, W_up, b_up = self.projections()
        h = ACTIVATIONS[self.activation](F.linear(base_out.to(W_down.dtype), W_down, b_down))  # (…, m)
        h = F.linear(h, W_up, b_up)  # (…, d)
        if self.dropout:
            h = F.dropout(h, self.dropout, self.training)
        return h.to(base_out.dtype)

    def delta(self, base: nn.Module) -> None:
        return None  # f is non-linear: no weight delta (the config's has_delta is False)

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.named_parameters() if k in self.peft_keys}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        params = dict(self.named_parameters())
        for key in self.peft_keys:
            params[key].copy_(state[key])
