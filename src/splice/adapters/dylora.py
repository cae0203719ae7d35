"""DyLoRA: LoRA trained for every rank at once (Valipour et al. 2023, https://arxiv.org/abs/2210.07558).

        x ──► W₀ (frozen) ───────────────────────────┐
        │                                            (+) ──► y      y = W₀x + (α/b) · B[:, :b] A[:b] x
        └──► drop ──► A[:b] (b×in) ──► B[:, :b] (out×b) ─┘            b ∈ {r_min, …, r}; A: Kaiming, B: 0

The components are nested: the first b rows of A and columns of B, scaled by α/b (the paper's scale, α over the
rank in use, not over r), are a rank-b LoRA for every b. Training makes them so:

- Every step draws one rank b ~ U{r_min, …, r} for the whole model (the paper's p_B is uniform). The training hook
  (`config.training_hook`, a `RankSampler`) draws it after each step for the next one, from its own generator
  seeded by `seed`; the first draw is made when the hook is built.
- The forward at rank b uses only components ≤ b; components above b are not in the graph. Each component is its
  own Parameter (A_i: 1×in, B_i: out×1), so a component above b has no gradient at all (None) and AdamW leaves it,
  and its moments, untouched: with one (r, in) tensor its zero gradient would still move it by Adam's momentum.
- `frozen` chooses what trains at rank b. The paper's Algorithm 1 updates only the b-th row of A and column of B
  (the parameters unique to rank b; the ones below are used but detached): `frozen=True`. splice's default,
  `frozen=False`, updates every component ≤ b (the same nested objective, as in nested dropout). The choice is
  deliberate: in a short run each component of the frozen form trains on only ~1/(r − r_min + 1) of the steps
  (about 20 of the quality benchmark's ~170 at r = 8), so it would not train well out of the box.
- Trained without the hook (a loop that does not call it), the adapter is plain LoRA of rank r (every component
  trains, scale α/r).

After training any rank b ≤ r works. `eval_rank` (default r) is the rank of the eval-mode forward, of `delta()`
(LowRank of rank b), merge and `get_delta`; `set_dylora_rank(model, b)` changes it, and
`truncate_dylora(model, b)` turns the adapter into a plain LoRA adapter of rank b (lora_alpha = α, so LoRA's α/b
scale is DyLoRA's) that `save_adapter` writes as a PEFT LoRA folder (PEFT, vLLM and LoRAX read it).

Trainable parameters per wrapped module: r·(in + out), as LoRA of rank r. PEFT has no DyLoRA: `save_adapter` writes
PEFT's folder shape with `peft_type: null`, `splice_method: "dylora"`, the config (eval_rank included) in
adapter_config.json and the full nested factors as `<module>.dylora_A` (r, in) and `<module>.dylora_B` (out, r).
Wraps nn.Linear and HF Conv1D. Defaults: r 8, r_min 1 (the paper trains ranks 1…r), lora_alpha 8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, doc
from splice.adapters.lora import lora_update, linear_weight, module_dims
from splice.adapters.ops import lora_linear
from splice.adapters.registry import register
from splice.delta.forms import Delta
from splice.errors import SpliceError

KINDS = ("linear", "conv1d")
KEY_A, KEY_B = "dylora_A", "dylora_B"


@dataclass
class DyLoraConfig(AdapterConfig):
    """DyLoRA hyper-parameters; r, lora_alpha, lora_dropout mean what they mean for LoRA."""

    r: int = doc("Largest rank: the adapter holds r nested components and any rank b ≤ r can be used after "
                 "training.", default=8)
    r_min: int = doc("Smallest rank drawn during training (ranks are drawn uniformly from r_min … r).", default=1)
    lora_alpha: float = doc("Scaling numerator: at rank b the update is scaled by lora_alpha / b.", default=8)
    lora_dropout: float = doc("Dropout on the input of the low-rank branch (training only).", default=0.0)
    eval_rank: int | None = doc("Rank used outside training (eval forward, delta, merge, save): 1 … r; None: r.",
                                default=None)
    frozen: bool = doc("Train only the b-th component at drawn rank b (the paper's Algorithm 1) instead of every "
                       "component ≤ b.", default=False)
    seed: int = doc("Seed of the rank draws of the training hook.", default=0)

    params_formula: ClassVar[str] = "r·(in + out) (r nested components; any rank b ≤ r is usable)"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "r_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpliceError(f"{name}: must be a positive integer, got {value!r}")
        if self.r_min > self.r:
            raise SpliceError(f"r_min: {self.r_min} is larger than r {self.r}")
        if self.eval_rank is None:
            self.eval_rank = self.r
        if isinstance(self.eval_rank, bool) or not isinstance(self.eval_rank, int) or \
                not 1 <= self.eval_rank <= self.r:
            raise SpliceError(f"eval_rank: must be an integer in 1 … r ({self.r}), got {self.eval_rank!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise SpliceError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.frozen, bool):
            raise SpliceError(f"frozen: must be true or false, got {self.frozen!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SpliceError(f"seed: must be an integer, got {self.seed!r}")

    def training_hook(self, model: nn.Module, adapter_name: str, total_steps: int) -> "RankSampler":
        """What the training loop runs for this method: one rank draw per step for the whole adapter."""
        return RankSampler(model, adapter_name, self, total_steps)


@register("dylora", config=DyLoraConfig, reference="https://arxiv.org/abs/2210.07558")
class DyLoraAdapter(nn.Module):
    """One DyLoRA adapter on one module: components A_i (1, in) and B_i (out, 1), i = 1 … r."""

    peft_keys: ClassVar[tuple[str, ...]] = (KEY_A, KEY_B)

    @classmethod
    def peft_shapes(cls, base: nn.Module, kind: str, config: DyLoraConfig) -> dict[str, tuple[int, ...]]:
        in_f, out_f = module_dims(base, kind)
        return {KEY_A: (config.r, in_f), KEY_B: (out_f, config.r)}

    @classmethod
    def peft_missing(cls, tensors: dict[str, Tensor]) -> str | None:
        return None if {KEY_A, KEY_B} <= tensors.keys() else f"expected {KEY_A} and {KEY_B}"

    def __init__(self, base: nn.Module, kind: str, config: DyLoraConfig):
        super().__init__()
        if kind not in KINDS:
            raise SpliceError(f"dylora cannot wrap {type(base).__name__}; it wraps nn.Linear and HF Conv1D")
        in_f, out_f = module_dims(base, kind)
        if config.r > min(in_f, out_f):
            raise SpliceError(f"r: rank {config.r} is larger than the layer ({in_f} → {out_f})")
        self.kind = kind
        self.r = config.r
        self.lora_alpha = float(config.lora_alpha)
        self.dropout = float(config.lora_dropout)
        self.frozen = config.frozen
        self.eval_rank = config.eval_rank
        self.train_rank: int | None = None  # set by the RankSampler; None: train at the full rank r
        dev, dt = base.weight.device, base.weight.dtype
        A = torch.empty(config.r, in_f, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # LoRA's init of the whole (r, in) factor, then split
        self.lora_A = nn.ParameterList([nn.Parameter(row.clone()) for row in A.split(1, 0)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(out_f, 1, device=dev, dtype=dt))
                                        for _ in range(config.r)])

    def rank(self) -> int:
        """The rank the forward uses now: the drawn one in training (r before any draw), eval_rank otherwise."""
        if self.training:
            return self.train_rank or self.r
        return self.eval_rank

    def factors(self, b: int) -> tuple[Tensor, Tensor]:
        """(A[:b], B[:, :b]) as (b, in) and (out, b) matrices."""
        return torch.cat(list(self.lora_A)[:b], 0), torch.cat(list(self.lora_B)[:b], 1)

    def _forward_factors(self) -> tuple[Tensor, Tensor, float]:
        b = self.rank()
        A, B = list(self.lora_A)[:b], list(self.lora_B)[:b]
        if self.frozen and self.training and self.train_rank is not None:  # Algorithm 1: only the b-th trains
            A = [a.detach() for a in A[:-1]] + A[-1:]
            B = [t.detach() for t in B[:-1]] + B[-1:]
        return torch.cat(A, 0), torch.cat(B, 1), self.lora_alpha / b

    # -- forward -------------------------------------------------------------------------------------------------
    def fused_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        A, B, scale = self._forward_factors()
        p = self.dropout if self.training else 0.0
        return lora_linear(x, linear_weight(base, self.kind), base.bias, A, B, scale, p)

    def contribution(self, x: Tensor, base_out: Tensor, base: nn.Module) -> Tensor:
        A, B, scale = self._forward_factors()
        xd = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return ((xd.to(A.dtype) @ (A * scale).t()) @ B.t()).to(base_out.dtype)

    # -- the delta and the folder --------------------------------------------------------------------------------
    def delta(self, base: nn.Module) -> dict[str, Delta]:
        A, B = (t.detach() for t in self.factors(self.eval_rank))
        return {"weight": lora_update(B, A, self.lora_alpha / self.eval_rank, self.kind, base.weight.shape)}

    def peft_state(self, base: nn.Module) -> dict[str, Tensor]:
        A, B = self.factors(self.r)
        return {KEY_A: A.detach(), KEY_B: B.detach()}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor], base: nn.Module) -> None:
        for i in range(self.r):
            self.lora_A[i].copy_(state[KEY_A][i:i + 1])
            self.lora_B[i].copy_(state[KEY_B][:, i:i + 1])


def _dylora_layers(model: nn.Module, adapter_name: str) -> list[tuple[Any, DyLoraAdapter]]:
    from splice.adapters.inject import adapter_layers

    return [(layer, layer.adapters[adapter_name]) for _, layer in adapter_layers(model)
            if adapter_name in layer.adapters and isinstance(layer.adapters[adapter_name], DyLoraAdapter)]


class RankSampler:
    """DyLoRA's rank draw (the training hook): one b ~ U{r_min … r} for every module of one adapter, per step."""

    def __init__(self, model: nn.Module, adapter_name: str, config: DyLoraConfig, total_steps: int | None = None):
        self.total_steps = total_steps
        self.adapters = [a for _, a in _dylora_layers(model, adapter_name)]
        if not self.adapters:
            raise SpliceError(f"adapter {adapter_name!r} has no DyLoRA module")
        self.low, self.high = config.r_min, config.r
        self.generator = torch.Generator().manual_seed(config.seed)
        self.rank = 0
        self._draw()  # the rank of the first step

    def _draw(self) -> None:
        self.rank = int(torch.randint(self.low, self.high + 1, (1,), generator=self.generator))
        for a in self.adapters:
            a.train_rank = self.rank

    def after_step(self, step: int) -> None:
        """Draw the rank of the next step (the loop calls this after the optimizer step); after the last one, the
        adapter goes back to its full rank r for any later forward."""
        if self.total_steps is not None and step >= self.total_steps:
            for a in self.adapters:
                a.train_rank = None
            return
        self._draw()


def _checked(model: nn.Module, adapter_name: str, rank: int | None) -> tuple[DyLoraConfig, int]:
    from splice.adapters.model import _check_name, configs

    _check_name(model, adapter_name)
    config = configs(model)[adapter_name]
    if not isinstance(config, DyLoraConfig):
        raise SpliceError(f"adapter {adapter_name!r} is {config.method}, not dylora")
    rank = config.eval_rank if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= config.r:
        raise SpliceError(f"rank: must be an integer in 1 … r ({config.r}) of adapter {adapter_name!r}, got {rank!r}")
    if any(adapter_name in layer.merged for layer, _ in _dylora_layers(model, adapter_name)):
        raise SpliceError(f"adapter {adapter_name!r} is merged into the base; unmerge it before changing its rank")
    return config, rank


def set_dylora_rank(model: nn.Module, rank: int, adapter_name: str = "default") -> None:
    """Use DyLoRA adapter `adapter_name` at rank `rank` (1 … r) outside training: its eval forward, delta, merge
    and saved folder (the config's `eval_rank`) all follow."""
    config, rank = _checked(model, adapter_name, rank)
    for _, adapter in _dylora_layers(model, adapter_name):
        adapter.eval_rank = rank
    config.eval_rank = rank


def truncate_dylora(model: nn.Module, rank: int | None = None, adapter_name: str = "default") -> nn.Module:
    """Replace DyLoRA adapter `adapter_name` by a plain LoRA adapter of rank `rank` (default: its eval_rank).

    The LoRA adapter holds A[:b], B[:, :b] with lora_alpha = α, so its scale α/b is DyLoRA's at rank b and the
    model computes the same function; `save_adapter` then writes a PEFT LoRA folder. The other components are
    dropped. Returns the model (changed in place).
    """
    from splice.adapters.lora import LoraAdapter, LoraConfig
    from splice.adapters.model import configs

    config, rank = _checked(model, adapter_name, rank)
    lora = LoraConfig(r=rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.target_modules, exclude_modules=config.exclude_modules,
                      modules_to_save=config.modules_to_save)
    for layer, adapter in _dylora_layers(model, adapter_name):
        with torch.random.fork_rng():  # LoRA's own init draws numbers that are overwritten at once
            plain = LoraAdapter(layer.base, layer.kind, lora)
        A, B = adapter.factors(rank)
        with torch.no_grad():
            plain.lora_A.copy_(A)
            plain.lora_B.copy_(B)
        plain.requires_grad_(adapter.lora_B[0].requires_grad)
        plain.train(adapter.training)
        layer.adapters[adapter_name] = plain
    configs(model)[adapter_name] = lora
    return model
