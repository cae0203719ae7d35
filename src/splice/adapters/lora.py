"""LoRA: low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

        x ──► W₀ (frozen) ──────────────┐
        │                               (+) ──► y          y = W₀x + (α/r) · B A x
        └──► drop ──► A (r×in) ──► B (out×r) ──┘            A: Kaiming or Gaussian, B: 0 → starts at W₀

- rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by α/√r so that higher ranks still learn.
- PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948) starts A, B at the top-r singular triplets of W₀ and
  trains on the residual W₀ − sB₀A₀. The base weight here is never modified: the layer adds −sB₀A₀ itself, so the
  update against the *original* base is s(BA − B₀A₀), exact and rank 2r (what PEFT writes on conversion).
- Other starts (OLoRA, ...) live in `splice.adapters.inits`, one file each, and are handled the same way.
- Wraps nn.Linear, HF Conv1D (GPT-2; its weight is stored transposed), nn.Embedding and nn.Conv2d, with PEFT's
  parameter shapes and key names so that folders interchange with PEFT, vLLM and LoRAX.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, config_from_dict, doc, pattern_value
from splice.adapters.inits import DATA_INITS, WEIGHT_STARTS, CordaConfig, EvaConfig, LoraGAConfig
from splice.adapters.ops import lora_linear
from splice.adapters.registry import register
from splice.delta.forms import Delta, Dense, LowRank
from splice.errors import SpliceError

KINDS = ("linear", "conv1d", "embedding", "conv2d")
# PEFT options that change the math in ways splice does not implement: refuse rather than load wrongly.
_UNSUPPORTED = ("use_qalora", "lora_bias", "target_parameters", "layer_replication", "trainable_token_indices",
                "use_bdlora", "alora_invocation_tokens")
INITS = ("kaiming", "gaussian", *WEIGHT_STARTS, *DATA_INITS)


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA hyper-parameters; field names and meanings follow PEFT's `LoraConfig`."""

    r: int = doc("Rank of the update B·A.", default=8)
    lora_alpha: float = doc("Scaling numerator: the update is scaled by lora_alpha / r (or / √r with rsLoRA).", default=8)
    lora_dropout: float = doc("Dropout on the input of the low-rank branch (training only).", default=0.0)
    use_rslora: bool = doc("Scale by lora_alpha / √r (rank-stabilised LoRA) instead of lora_alpha / r.", default=False)
    bias: Literal["none", "all", "lora_only"] = doc(
        "Which biases train: none, those of the wrapped modules (lora_only), or every bias in the model (all).",
        default="none",
    )
    init_lora_weights: Literal["kaiming", "gaussian", "pissa", "olora", "eva", "lora_ga", "corda"] | bool = doc(
        "Initialisation of A (B starts at 0): kaiming (PEFT's default, also `true`), gaussian (std 1/r), pissa "
        "(A, B from the top-r singular vectors of the base weight), olora (from its QR decomposition), or, from "
        "calibration data, eva (A from the principal directions of each layer's inputs; ranks redistributed) or "
        "lora_ga (A, B from the SVD of the full-weight gradient) or corda (from the SVD of the weight times the "
        "input covariance).",
        default="kaiming",
    )
    eva_config: EvaConfig | None = doc("Options of init_lora_weights=eva (rho, use_label_mask, whiten, "
                                       "adjust_scaling_factors).", default=None)
    lora_ga_config: LoraGAConfig | None = doc("Options of init_lora_weights=lora_ga (direction, scale, "
                                              "stable_gamma).", default=None)
    corda_config: CordaConfig | None = doc("Options of init_lora_weights=corda (corda_method: ipm or kpm).",
                                           default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_lora_weights is True:
            self.init_lora_weights = "kaiming"
        if not isinstance(self.r, int) or self.r < 1:
            raise SpliceError(f"r: must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise SpliceError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise SpliceError(f"bias: must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in INITS:
            raise SpliceError(
                f"init_lora_weights: must be one of {', '.join(INITS)}, got {self.init_lora_weights!r}"
            )
        self.eva_config = _options(self.eva_config, EvaConfig, "eva_config", self.init_lora_weights == "eva")
        self.lora_ga_config = _options(self.lora_ga_config, LoraGAConfig, "lora_ga_config",
                                       self.init_lora_weights == "lora_ga")
        self.corda_config = _options(self.corda_config, CordaConfig, "corda_config",
                                     self.init_lora_weights == "corda")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def needs_calibration(self) -> bool:
        return self.init_lora_weights in DATA_INITS

    # -- PEFT's adapter_config.json ------------------------------------------------------------------------------
    peft_type: ClassVar[str | None] = "LORA"

    @classmethod
    def claims_peft(cls, cfg: dict[str, Any]) -> bool:
        return not cfg.get("use_dora")

    @classmethod
    def fields_from_peft(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        for key in _UNSUPPORTED:
            if cfg.get(key):
                raise SpliceError(f"{key}={cfg[key]!r} is not supported by splice")
        # rank_pattern needs nothing: each module's rank is read from its tensors' shapes (for_module).
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and (init.startswith("pissa_niter") or init in ("corda", "lora_ga")):
            # PEFT saved it unconverted: it runs on a residual base (W − s·B₀A₀) that only its own start rebuilds.
            raise SpliceError(f"init_lora_weights={init!r}: this folder was saved without PEFT's conversion to a plain "
                              "LoRA, and its start cannot be rebuilt exactly here; save it from PEFT with "
                              "path_initial_model_for_weight_conversion")
        # An unconverted PiSSA / OLoRA folder runs on W − s·B₀A₀ with B₀A₀ from the base's own SVD / QR, which the
        # start rebuilds exactly (a kaiming start would leave out s·B₀A₀); anything else starts at B = 0.
        keep = ("gaussian", "pissa", "olora")
        return {**super().fields_from_peft(cfg), "r": int(cfg.get("r", 8)), "lora_alpha": cfg.get("lora_alpha", 8),
                "lora_dropout": float(cfg.get("lora_dropout", 0.0)), "use_rslora": bool(cfg.get("use_rslora", False)),
                "bias": cfg.get("bias", "none"), "init_lora_weights": init if init in keep else "kaiming"}

    def to_peft(self, *, base: str | None, kinds: set[str], adapters: list[Any]) -> dict[str, Any]:
        from splice.io.peft_format import peft_config_dict

        r, alpha = self.r, self.lora_alpha
        if any(getattr(a, "pissa", False) for a in adapters):  # saved as the equivalent plain LoRA of rank 2r
            r, alpha = 2 * r, alpha * (math.sqrt(2) if self.use_rslora else 2)
        return peft_config_dict(self, fan_in_fan_out="conv1d" in kinds, base=base, r=r, lora_alpha=alpha)

    def for_module(self, module: str, tensors: dict[str, Any], peft_cfg: dict[str, Any]) -> "LoraConfig":
        """This module's rank (from its tensors) and alpha (PEFT's alpha_pattern)."""
        rank = tensors.get("lora_A.weight", tensors.get("lora_embedding_A")).shape[0]
        alpha = pattern_value(module, peft_cfg.get("alpha_pattern"), self.lora_alpha)
        return dataclasses.replace(self, r=rank, lora_alpha=alpha)


def _options(value: Any, cls: type, name: str, needed: bool) -> Any:
    """An init's options from a dict (YAML, JSON), or their defaults when the init is chosen and none were given."""
    if isinstance(value, dict):
        return config_from_dict(cls, value, name)
    return cls() if value is None and needed else value


def module_dims(base: nn.Module, kind: str) -> tuple[int, int]:
    """(in_features, out_features) of the module as LoRA sees it."""
    if kind == "linear":
        return base.in_features, base.out_features
    if kind == "conv1d":  # HF Conv1D: weight is (in, out), y = x W + b
        return base.weight.shape[0], base.weight.shape[1]
    if kind == "embedding":
        return base.num_embeddings, base.embedding_dim
    if kind == "conv2d":
        return base.in_channels, base.out_channels
    raise SpliceError(f"LoRA cannot wrap a module of kind {kind!r}; it wraps {', '.join(KINDS)}")


def lora_update(B: Tensor, A: Tensor, scale: float, kind: str, shape: torch.Size) -> LowRank:
    """The update s·B·A as the base parameter of `kind` stores it (Conv1D and Embedding store it transposed).

    Args:
        B: (out, r) and A: (r, in·kh·kw) as matrices (PEFT's tensors reshaped).
        shape: the base weight's shape.
    """
    if kind in ("conv1d", "embedding"):  # the weight is (in, out): the update is (BA)ᵀ = Aᵀ Bᵀ
        return LowRank(A.t(), B.t(), scale, shape)
    return LowRank(B, A, scale, shape)


def linear_weight(base: nn.Module, kind: str) -> Tensor:
    """The base weight as an (out, in) matrix view (Conv1D stores it transposed)."""
    return base.weight.t() if kind == "conv1d" else base.weight


@register("lora", config=LoraConfig, reference="https://arxiv.org/abs/2106.09685")
class LoraAdapter(nn.Module):
    """One LoRA adapter on one module. Shapes follow PEFT: A (r, in[, kh, kw]), B (out, r[, 1, 1]).

    For an embedding PEFT stores A as (r, num_embeddings) and B as (dim, r), initialised the other way round
    (A = 0, B random), and the update is (B A)ᵀ.
    """

    peft_keys: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: LoraConfig) -> dict[str, tuple[int, ...]]:
        """PEFT's tensor names and shapes for this module (what a loaded folder must hold)."""
        from splice.io.peft_format import lora_shapes

        in_f, out_f = module_dims(base, kind)
        return lora_shapes(kind, in_f, out_f, config.r, base)

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        """What a folder's module lacks, or None (checked before any base is looked at)."""
        if {"lora_A.weight", "lora_B.weight"} <= tensors.keys() or {"lora_embedding_A", "lora_embedding_B"} <= \
                tensors.keys():
            return None
        return "expected both A and B"

    def __init__(self, base: nn.Module, kind: str, config: LoraConfig):
        super().__init__()
        if kind not in KINDS:
            raise SpliceError(f"{config.method} cannot wrap {type(base).__name__}; it wraps {', '.join(KINDS)}")
        if kind == "conv2d" and base.groups != 1:
            raise SpliceError(f"{config.method} cannot wrap a grouped Conv2d (groups={base.groups})")
        self.kind = kind
        self.r = config.r
        self.scale = config.scaling
        self.lora_alpha = config.lora_alpha
        self.dropout = float(config.lora_dropout)
        in_f, out_f = module_dims(base, kind)
        dev, dt = base.weight.device, torch.float32 if not base.weight.is_floating_point() else base.weight.dtype
        if kind == "conv2d":
            kh, kw = base.kernel_size
            self.lora_A = nn.Parameter(torch.zeros(config.r, in_f, kh, kw, device=dev, dtype=dt))
            self.lora_B = nn.Parameter(torch.zeros(out_f, config.r, 1, 1, device=dev, dtype=dt))
        else:
            self.lora_A = nn.Parameter(torch.zeros(config.r, in_f, device=dev, dtype=dt))
            self.lora_B = nn.Parameter(torch.zeros(out_f, config.r, device=dev, dtype=dt))
        self.lora_bias = None
        if config.bias != "none" and getattr(base, "bias", None) is not None:
            self.lora_bias = nn.Parameter(torch.zeros_like(base.bias))
        # True once `start` set s B₀ A₀ ≠ 0 (PiSSA, OLoRA, ...), subtracted in forward; see splice.adapters.inits.
        self.pissa = False
        self.reset(base, config.init_lora_weights)

    @torch.no_grad()
    def reset(self, base: nn.Module, init: str) -> None:
        """Initialise so that the adapted module starts equal to the base (a start B₀A₀ ≠ 0 is subtracted)."""
        if init in WEIGHT_STARTS and self.kind not in ("linear", "conv1d"):
            raise SpliceError(f"init_lora_weights: {init} needs a linear layer, not {self.kind}")
        # A rank above the layer's is allowed (PEFT allows it; a 2-label head under all-linear needs it), except for
        # the starts taken from the weight's own top-r decomposition, which has no more than min(in, out) parts.
        in_f, out_f = self.lora_A.shape[1], self.lora_B.shape[0]
        if init in WEIGHT_STARTS and self.r > min(in_f, out_f):
            raise SpliceError(f"r: rank {self.r} is larger than the layer ({in_f} → {out_f}), which the {init} start "
                              "decomposes")
        if self.kind == "embedding":
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if init in WEIGHT_STARTS:
            self.start(*WEIGHT_STARTS[init](linear_weight(base, self.kind).float(), self.r, self.scale))

    @torch.no_grad()
    def start(self, A0: Tensor, B0: Tensor) -> None:
        """Start at A = A0 (r, in), B = B0 (out, r), with s B0 A0 subtracted in forward (the base stays untouched)."""
        self.lora_A.copy_(A0)
        self.lora_B.copy_(B0)
        self.pissa = True
        self.register_buffer("pissa_A0", self.lora_A.detach().clone())
        self.register_buffer("pissa_B0", self.lora_B.detach().clone())

    # -- forward -------------------------------------------------------------------------------------------------
    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        if self.kind not in ("linear", "conv1d") or self.pissa:
            out = base(x)
            return out + self.contribution(x, out, base)
        bias = base.bias if self.lora_bias is None else base.bias + self.lora_bias
        p = self.dropout if self.training else 0.0
        return lora_linear(x, linear_weight(base, self.kind), bias, self.lora_A, self.lora_B, self.scale, p)

    def add_into(self, x: Tensor, out: Tensor) -> bool:
        """out += this adapter's update of x, in place: one GEMM for x·Aᵀ, one addmm (scale folded in) into `out`.

        The mixed-batch path: a group there is often one decoding row, where the cost is per operation, not per
        FLOP; this makes two operations of the update's five. Returns False (nothing done) where the general
        `contribution` is needed: autograd on, dropout active, PiSSA, a LoRA bias, a non-linear kind, mixed dtypes.
        """
        A, B = self.lora_A, self.lora_B
        if (type(self).contribution is not LoraAdapter.contribution  # a subclass with other math (DoRA)
                or self.kind not in ("linear", "conv1d") or self.pissa or self.lora_bias is not None
                or (self.dropout and self.training) or torch.is_grad_enabled() or not out.is_contiguous()
                or not x.dtype == out.dtype == A.dtype):
            return False
        h = x.reshape(-1, A.shape[1]) @ A.t()
        out.view(-1, B.shape[0]).addmm_(h, B.t(), alpha=self.scale)
        return True

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        A, B = self.lora_A, self.lora_B
        if self.kind == "embedding":
            out = F.embedding(x, A.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse) @ B.t()
            return out * self.scale
        xd = F.dropout(x, self.dropout, self.training) if self.dropout else x
        if self.kind == "conv2d":
            h = F.conv2d(xd.to(A.dtype), A, None, base.stride, base.padding, base.dilation)
            out = F.conv2d(h, B) * self.scale
        else:
            if self.pissa:  # one rounding order for both terms, so that the start is exactly 0 in bf16 too
                out = ((xd.to(A.dtype) @ A.t()) @ B.t() - (x.to(A.dtype) @ self.pissa_A0.t()) @ self.pissa_B0.t()) \
                    * self.scale
            else:
                out = (xd.to(A.dtype) @ (A * self.scale).t()) @ B.t()  # scale the (r, in) factor, not the output
        if self.lora_bias is not None:
            shape = (-1, 1, 1) if self.kind == "conv2d" else (-1,)
            out = out + self.lora_bias.view(shape)
        return out.to(base_out.dtype)

    # -- the delta -----------------------------------------------------------------------------------------------
    def low_rank(self) -> tuple[Tensor, Tensor]:
        """(B, A) as (out, r) and (r, in·kh·kw) matrices of the update, PiSSA's −B₀A₀ included."""
        B, A = self.lora_B.reshape(self.lora_B.shape[0], self.r), self.lora_A.reshape(self.r, -1)
        if self.pissa:
            B, A = torch.cat([B, -self.pissa_B0], 1), torch.cat([A, self.pissa_A0], 0)
        return B, A

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        B, A = (t.detach() for t in self.low_rank())
        out: dict[str, Delta] = {"weight": lora_update(B, A, self.scale, self.kind, base.weight.shape)}
        if self.lora_bias is not None:
            out["bias"] = Dense(self.lora_bias.detach())
        return out

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        # PEFT keeps a wrapped module's bias on its `base_layer` and loads it only under that key.
        out = {"base_layer.bias": (base.bias + self.lora_bias).detach()} if self.lora_bias is not None else {}
        if self.pissa:  # saved as the equivalent plain LoRA of rank 2r against the original base
            B, A = self.low_rank()
            A, B = A.reshape(2 * self.r, *self.lora_A.shape[1:]), B.reshape(B.shape[0], 2 * self.r, *self.lora_B.shape[2:])
        else:
            A, B = self.lora_A, self.lora_B
        if self.kind == "embedding":
            return {**out, "lora_embedding_A": A.detach(), "lora_embedding_B": B.detach()}
        return {**out, "lora_A.weight": A.detach(), "lora_B.weight": B.detach()}

    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        """Copy PEFT tensors in; shapes were checked by the loader against this module."""
        with torch.no_grad():
            if self.lora_bias is not None and "bias" in state:
                self.lora_bias.copy_(state["bias"] - base.bias)
            a = state.get("lora_embedding_A", state.get("lora_A.weight"))
            b = state.get("lora_embedding_B", state.get("lora_B.weight"))
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)
