#!/usr/bin/env python
"""Adapter benchmark: splice vs PEFT on all-MiniLM-L6-v2 (BertModel) + mean pooling + a 2-class linear head.

    python bench/adapters.py                 # full run, writes bench/RESULTS.md
    python bench/adapters.py --quick         # smoke run: dropout 0.1 only, no q/v rows, a sample of the methods PEFT
                                             # does not have, 2 rounds
    python bench/adapters.py --quick --kinds nola_default,lora_qv --rounds 1 --out /tmp/smoke.md
                                             # only these configurations (+ the floor and each method's LoRA anchor);
                                             # --list-kinds names them all
    python bench/adapters.py --profile       # torch.profiler: LoRA/DoRA all-linear steps (splice, PEFT) vs floor
    python bench/adapters.py --profile --kinds spiel_default   # a method PEFT does not have vs its LoRA anchor

What is measured (batch 32, sequence 128: every row filled with random token ids, fixed seed, no padding):

- training step = forward + backward + AdamW step, for the frozen FLOOR (every encoder weight frozen but the
  gradient flows back through the whole encoder: the input embeddings' output requires grad; only the head
  trains), full fine-tuning, and LoRA r8 on query/value, LoRA r8 all-linear and DoRA r8 all-linear, each for
  splice and PEFT with the same config (r=8, lora_alpha=16), with lora_dropout 0.1 (main table) and 0.0; and every
  other registered method that PEFT also has (IA3, LoHa, LoKr, VeRA, LN tuning, ...: found through the registry),
  with its default config on all linear layers, PEFT's config built from splice's own adapter_config.json mapping;
  the table gives splice ÷ PEFT for the step time and for the memory increment, and the reason (REASONS below, or
  "not analysed") where splice is the slower. A method with a training hook runs it in both (AdaLoRA: splice's
  rank allocator; PEFT's `update_and_allocate` and its orthogonal regulariser).
  The configurations are interleaved round-robin (shuffled order in every round) so machine noise hits all of
  them alike; speed is reported as the median over rounds of the ratio to the floor measured in the same round.
  A step during which other processes took more than 10% of the CPUs (read from /proc/stat) is retried once the
  machine is quiet, so a burst from a neighbour does not land on one configuration only.
- every registered module-adapter method that PEFT does NOT have (BitFit, Houlsby, Compacter, SSF, DyLoRA, IncreLoRA,
  SaRA, SpIEL, S2FT, PaCA, NOLA, the SVD family, ...: found through the registry, prompt methods excluded), splice
  only, its config built as the quality benchmark builds it (`splice.bench.arms.Arm.adapter_config`: defaults, plus
  r=8 / lora_alpha=16 / lora_dropout 0 where the config has them), beside an anchor: splice LoRA r8 (lora_alpha 16,
  lora_dropout 0) on the same `target_modules` (one anchor per distinct targets value: query/value, all-linear, or
  the method's own regex or suffix list). Its table ("Methods PEFT does not have") states the config's
  `params_formula`, the wrapped modules' shapes and the trainable count measured, the step time and its ratio to the
  anchor's (median over rounds of the per-round ratio), the memory increment beside the anchor's, and a verdict
  against issue 9's limit, step ≤ 1.3 × the anchor's, with the reason of each FAIL (REASONS, or "not analysed").
- a method's training hook (`config.training_hook`: AdaLoRA, SORSA, SaRA, SpIEL, DyLoRA, IncreLoRA) is built as
  `splice train` builds it (`splice.train.run.method_hooks`, for a run of RUN_STEPS steps) and called where the
  training loop calls it: `loss()` added to the loss, `after_step(step)` after the optimizer step, `bind_optimizer`
  once; a data-driven start (`config.needs_calibration`: LoRA-SB) gets `splice.train.run.calibration_arguments`
  from random batches like the timed one (other seeds, random labels, the classification loss).
- memory-efficient training (splice.train.optim: GaLore, LISA, HFT, ReLoRA; one row per registered strategy, with
  its defaults, on what it pairs with: full fine-tuning, or splice LoRA r8 query/value), driven through the
  strategy's own hooks (its optimizer, before/after each step), timed and measured like the rows above; the report
  sets each row's measured memory saving beside the saving its mechanism implies (gradients and optimizer state
  it does not hold).
- peak memory: one fresh subprocess per configuration; peak RSS (VmHWM, reset after loading) over 5 steps (glibc's
  heap keeps growing for the first few steps, so one step under-reports), and its increment over the RSS right
  after the base model was loaded; the peak covers building the adapter too (a calibrated start's gradients).
- inference (eval, no_grad): base model, LoRA all-linear unmerged / merged (splice.merge_adapter), a mixed batch
  of 3 adapters (splice.mixed_batch; rows sorted by adapter, and interleaved) vs a single-adapter batch, and PEFT
  for reference; interleaved likewise.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

BATCH, SEQ, R, ALPHA, SEED = 32, 128, 8, 16, 0
# The run length a method's schedule is sized for (AdaLoRA's budget, IncreLoRA's growth, SpIEL's reselection rate,
# SaRA's adjustment step): the benchmark times the first steps of such a run.
RUN_STEPS = 1000
SPLICE_ONLY_LIMIT = 1.3  # issue 9: a method PEFT does not have steps within 1.3 × LoRA's time on the same targets

# Why a row is slower than its reference (PEFT's same method, or LoRA on the same targets for a method PEFT does not
# have), keyed by kind or by method name: what the method's code does per step beyond LoRA's, found by reading it
# and profiling it (`--profile --kinds KIND`). A slow row without an entry says "not analysed": never a guess.
REASONS: dict[str, str] = {
    "spiel": ("forms the dense weight gradient of every targeted layer (all linear layers by default): the forward "
              "runs one matmul with W₀ + S, whose full ∂L/∂W autograd computes before gathering the k trained "
              "entries (and SpIEL accumulates it for regrowth in its selection windows); LoRA forms only its "
              "r-wide factors' gradients"),
    "sara": ("forms the dense weight gradient of each targeted layer (one matmul with W₀ + S, ∂L/∂W computed in "
             "full, then gathered at the k entries), and an SVD of one targeted ΔW per step for the nuclear-norm "
             "penalty"),
    "svft": ("builds W₀ + U·diag(m)·Vᵀ for one matmul per targeted layer and step, so backward forms each targeted "
             "layer's dense weight gradient before projecting it on the singular vectors"),
    "sorsa": ("a rank-2r path per module (the trained U_p·diag(S_p)·V_pᵀ and its frozen start, which the layer "
              "subtracts, concatenated in every forward: twice LoRA's adapter matmuls), plus the orthonormal "
              "regulariser over every module each step"),
    "houlsby": ("a bottleneck on the module's output, m = out/16 = 24 wide (3× LoRA's r = 8 here), with a GELU, "
                "two biases and the residual add"),
    "pfeiffer": ("a bottleneck on the module's output, m = out/16 = 24 wide (3× LoRA's r = 8 here), with a ReLU, "
                 "two biases and the residual add"),
    "compacter": ("a bottleneck on the module's output whose two projections are rebuilt every forward as sums of "
                  "Kronecker products (Σ A_i ⊗ s_i t_iᵀ), with a GELU, two biases and the residual add"),
    "nola": ("mixes A and B from 1024 random bases each in every forward (a 1024-long product over r·in and out·r "
             "numbers per module, and its transpose in backward)"),
    "increlora": ("scores every triplet after each step (AdaLoRA's sensitivity and uncertainty EMAs over P, Λ, Q of "
                  "max_r = 2r components) and adds the orthogonality regulariser to the loss"),
}
HEADING = "## Adapters (bench/adapters.py)"
SORTED = "splice 3 adapters, mixed batch, rows sorted by adapter (11/11/10)"
INTERLEAVED = "splice 3 adapters, mixed batch, interleaved rows (a,b,c,a,…)"

# kind → (target_modules, use_dora, label); other methods: (target_modules, method name, label), from the registry
KINDS = {
    "lora_qv": (["query", "value"], False, "LoRA r8 query/value"),
    "lora_all": ("all-linear", False, "LoRA r8 all-linear"),
    "dora_all": ("all-linear", True, "DoRA r8 all-linear"),
}


def registry_kinds() -> dict[str, tuple]:
    """Every other registered method that PEFT also has, with its default config, on all linear layers (or, for a
    method that picks its own modules, such as LN tuning, on its default targets)."""
    from splice.adapters.config import AdapterConfig
    from splice.adapters.registry import get_method, method_names

    out = {}
    for name in method_names():
        config = get_method(name).config
        # Prompt methods (prompt/prefix/p-tuning) add virtual tokens, not module adapters: not rows of this table.
        if name in ("lora", "dora") or config.peft_type is None or not issubclass(config, AdapterConfig):
            continue
        target = None if config.wraps_any_module else "all-linear"
        out[f"{name}_all"] = (target, name, f"{name} (defaults){' all-linear' if target else ''}")
    return out


KINDS.update(registry_kinds())


def splice_only_config(method: str):
    """The config of a method PEFT does not have, built as the quality benchmark builds it
    (`splice.bench.arms.Arm.adapter_config`: the method's defaults, plus r=8 / lora_alpha=16 / lora_dropout 0 where
    the config has those fields), with a schedule's `total_step` set to the nominal run length."""
    from splice.bench.arms import Arm

    return with_run_length(Arm("splice", method).adapter_config())


def with_run_length(config):
    """A config whose schedule is sized by a `total_step` field left unset (AdaLoRA, IncreLoRA) gets RUN_STEPS, the
    same for splice and for PEFT (whose AdaLoRA refuses a config without one)."""
    import dataclasses

    if any(f.name == "total_step" for f in dataclasses.fields(config)) and config.total_step is None:
        config = dataclasses.replace(config, total_step=RUN_STEPS)
    return config


def splice_only_kinds() -> dict[str, tuple]:
    """Every registered module-adapter method that PEFT does not have (prompt methods excluded, as in
    `registry_kinds`): kind → (target_modules of its config, method, label)."""
    from splice.adapters.config import AdapterConfig
    from splice.adapters.registry import get_method, method_names

    out = {}
    for name in method_names():
        config = get_method(name).config
        if config.peft_type is not None or not issubclass(config, AdapterConfig):
            continue
        out[f"{name}_default"] = (splice_only_config(name).target_modules, name, f"{name} (defaults)")
    return out


def anchor_kinds(methods: dict[str, tuple]) -> tuple[dict[str, tuple], dict[str, str]]:
    """For each distinct `target_modules` among `methods`, splice LoRA r8 (alpha 16, dropout 0) on the same targets:
    the existing lora_qv / lora_all kinds for ["query", "value"] / "all-linear", a new kind otherwise (a regex or a
    list of suffixes works as LoRA's target too). Returns (new anchor kind → (target, False, label), method kind →
    its anchor kind)."""
    def norm(t):
        return tuple(sorted(t)) if isinstance(t, (list, tuple)) else t

    known = {norm(KINDS["lora_qv"][0]): "lora_qv", norm(KINDS["lora_all"][0]): "lora_all"}
    users: dict = {}
    for kind, (target, method, _) in methods.items():
        users.setdefault(norm(target), (target, []))[1].append(method)
    anchors, of = {}, {}
    for key, (target, names) in users.items():
        anchor = known.get(key) or f"lora_as_{names[0]}"
        if anchor not in known.values():
            anchors[anchor] = (target, False, f"LoRA r8 on the targets of {' / '.join(names)}")
        for kind, (t, _, _) in methods.items():
            if norm(t) == key:
                of[kind] = anchor
    return anchors, of


SPLICE_ONLY = splice_only_kinds()
ANCHOR_KINDS, ANCHOR_OF = anchor_kinds(SPLICE_ONLY)


def kind_entry(kind: str) -> tuple:
    """(target_modules, use_dora or method name, label) of any adapter kind."""
    return KINDS.get(kind) or ANCHOR_KINDS.get(kind) or SPLICE_ONLY[kind]


def quick_sample() -> list[str]:
    """--quick's sample of the methods PEFT does not have, taken from the registry: the first (by name) that needs
    calibration batches, the first with a training hook, the first with neither, so that a smoke run goes through
    each way a method is set up and stepped."""
    picked: dict[str, str] = {}
    for kind, (_, method, _) in SPLICE_ONLY.items():
        config = splice_only_config(method)
        path = ("calibration" if config.needs_calibration else "hook" if hasattr(config, "training_hook")
                else "plain")
        picked.setdefault(path, kind)
    return list(picked.values())


def strategy_kinds() -> dict[str, tuple[str, str, str]]:
    """Every registered training strategy on what it pairs with: kind → (base kind, strategy, label)."""
    from splice.train.optim.registry import get_strategy, strategy_names

    out = {}
    for name in strategy_names():
        on = "full" if get_strategy(name).pairs_with == "full" else "lora_qv"
        what = "full fine-tuning" if on == "full" else "splice LoRA r8 query/value"
        out[f"{on}+{name}"] = (on, name, f"{what} + {name} (defaults)")
    return out


STRATEGY_KINDS = strategy_kinds()


@dataclass(frozen=True)
class Spec:
    impl: str  # "-" (floor, full), "splice", "peft"
    kind: str  # "floor", "full", or a key of KINDS
    dropout: float = 0.0

    @property
    def key(self) -> str:
        return self.kind if self.impl == "-" else f"{self.impl}:{self.kind}:{self.dropout:g}"

    @staticmethod
    def parse(key: str) -> "Spec":
        if ":" not in key:
            return Spec("-", key)
        impl, kind, d = key.split(":")
        return Spec(impl, kind, float(d))

    @property
    def label(self) -> str:
        if self.kind == "floor":
            return "frozen model (floor)"
        if self.kind == "full":
            return "full fine-tuning"
        if self.kind in STRATEGY_KINDS:
            return STRATEGY_KINDS[self.kind][2]
        return f"{self.impl} {kind_entry(self.kind)[2]}"


def all_kinds() -> list[str]:
    """Every kind `--kinds` accepts (the floor is always measured)."""
    return ["full", *STRATEGY_KINDS, *KINDS, *SPLICE_ONLY, *ANCHOR_KINDS]


def specs_for(dropouts: list[float], kinds: list[str]) -> list[Spec]:
    """The configurations of the chosen kinds: the floor always; full fine-tuning when chosen or when a chosen
    strategy trains on it; each PEFT-shared kind for splice and PEFT (LoRA/DoRA at every dropout, a registry method
    once); each method PEFT does not have (splice only, its own config) with its LoRA anchor (dropout 0)."""
    chosen = set(kinds)
    out = [Spec("-", "floor")]
    if "full" in chosen or any(STRATEGY_KINDS[k][0] == "full" for k in chosen & set(STRATEGY_KINDS)):
        out.append(Spec("-", "full"))
    out += [Spec("-", k) for k in STRATEGY_KINDS if k in chosen]
    for i, d in enumerate(dropouts):
        for kind in KINDS:
            if kind not in chosen or (isinstance(KINDS[kind][1], str) and i):  # a registry method: once
                continue
            for impl in ("splice", "peft"):
                out.append(Spec(impl, kind, d))
    for kind in SPLICE_ONLY:
        if kind in chosen:
            out += [Spec("splice", ANCHOR_OF[kind], 0.0), Spec("splice", kind, 0.0)]
    out += [Spec("splice", k, 0.0) for k in ANCHOR_KINDS if k in chosen]
    return list(dict.fromkeys(out))  # an anchor that is also a chosen row is measured once


# -- model, data, step -----------------------------------------------------------------------------------------------
def model_path() -> Path:
    from splice.io.models import default_model_path

    return default_model_path()


def load_base() -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.logging.disable_progress_bar()
    except AttributeError:
        pass
    return transformers.AutoModel.from_pretrained(model_path())


def make_batch(vocab: int, rows: int = BATCH, seed: int = SEED) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (rows, SEQ), generator=g)  # above BERT's [unused]/special ids
    labels = torch.randint(0, 2, (rows,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def classify_loss(model: nn.Module, head: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    return F.cross_entropy(head(mean_pool(h, b["attention_mask"])), b["labels"])


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def lora_config(spec: Spec):
    import splice

    target, dora, _ = kind_entry(spec.kind)
    if spec.kind in SPLICE_ONLY:  # a method PEFT does not have: splice only, its config as the quality benchmark's
        return splice_only_config(dora)
    if isinstance(dora, str):  # another registered method: PEFT's config is built from splice's own translation
        config = with_run_length(splice.adapters.make_config(dora, **({"target_modules": target} if target else {})))
        if spec.impl == "splice":
            return config
        import peft

        fields = config.to_peft(base=None, kinds={"linear"}, adapters=[])
        return peft.PeftConfig.from_peft_type(**{**fields, "inference_mode": False})  # the folder format says True
    if spec.impl == "splice":
        cls = splice.DoraConfig if dora else splice.LoraConfig
        return cls(r=R, lora_alpha=ALPHA, target_modules=target, lora_dropout=spec.dropout)
    import peft

    return peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=target, lora_dropout=spec.dropout, use_dora=dora)


def calibration_for(config, model: nn.Module, head: nn.Module) -> dict:
    """adapt()'s calibration arguments, as `splice train` makes them (`splice.train.run.calibration_arguments`: its
    first CALIBRATION_BATCHES shuffled batches and the task loss), from the benchmark's own kind of input: random
    token ids (other seeds than the timed batch) with random labels for the classification loss; {} when the
    config's start needs no data."""
    from splice.train.loop import TrainConfig
    from splice.train.run import CALIBRATION_BATCHES, calibration_arguments

    if not getattr(config, "needs_calibration", False):
        return {}
    rows = make_batch(model.config.vocab_size, CALIBRATION_BATCHES * BATCH, SEED + 1)
    items = [{k: v[i] for k, v in rows.items()} for i in range(CALIBRATION_BATCHES * BATCH)]

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([x[k] for x in batch]) for k in batch[0]}

    return calibration_arguments(config, items, collate, TrainConfig(batch_size=BATCH, seed=SEED),
                                 lambda b: classify_loss(model, head, b))


def method_hooks(config, model: nn.Module) -> list:
    """What the method adds to the training loop (loss term, after-step work, the optimizer it must see), as
    `splice train` builds it (`splice.train.run.method_hooks`) for a run of RUN_STEPS steps."""
    from splice.train.loop import TrainConfig
    from splice.train.run import method_hooks as hooks

    return hooks(model, config, TrainConfig(max_steps=RUN_STEPS), RUN_STEPS)


class PeftAdaLoraHook:
    """What a PEFT AdaLoRA run adds to each step, as PEFT documents it: `base_model.update_and_allocate(step)` after
    the optimizer step, and the orthogonal regulariser `AdaLoraModel.forward` adds to `outputs.loss`. The benchmark's
    head sits outside the PEFT model, whose output then has no loss to add it to, so `loss()` computes it as that
    forward does (peft/tuners/adalora/model.py). A parameter the loss does not reach has no gradient, which PEFT's
    importance update does not expect (BertModel's pooler is adapted by "all-linear" but the benchmark pools the last
    hidden state itself; the regulariser reaches its lora_A and lora_B, not its lora_E): it gets a zero gradient
    first (splice's allocator skips such a parameter)."""

    def __init__(self, model: nn.Module):
        self.tuner = model.base_model
        self.name = self.tuner.trainable_adapter_name
        self.scored = [p for n, p in self.tuner.model.named_parameters() if "lora_" in n and self.name in n]

    def loss(self) -> torch.Tensor:
        terms = []
        for n, p in self.tuner.model.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and self.name in n:
                cov = p @ p.T if "lora_A" in n else p.T @ p
                terms.append(torch.norm(cov - torch.eye(*cov.size(), out=torch.empty_like(cov)), p="fro"))
        return self.tuner.peft_config[self.name].orth_reg_weight * (sum(terms) / len(terms))

    def after_step(self, step: int) -> None:
        for p in self.scored:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.tuner.update_and_allocate(step)


def module_shapes(model: nn.Module) -> str:
    """The wrapped modules, counted by shape: '12 × 384→384' (in → out), or by class for other kinds."""
    from collections import Counter

    from splice.adapters.inject import adapter_layers
    from splice.adapters.lora import module_dims

    counts: Counter = Counter()
    for _, layer in adapter_layers(model):
        if layer.kind in ("linear", "conv1d"):
            counts["{}→{}".format(*module_dims(layer.base, layer.kind))] += 1
        else:
            counts[type(layer.base).__name__] += 1
    return ", ".join(f"{n} × {k}" for k, n in counts.items())


def prepare(spec: Spec, model: nn.Module, head: nn.Module) -> tuple[nn.Module, dict, list]:
    """Turn a freshly loaded base model into the configuration `spec`; returns it, what it adapted, and the hooks
    the method adds to each training step (`head` is the classifier, for a calibration loss)."""
    hooks: list = []
    if spec.kind == "floor":
        model.requires_grad_(False)
        # Gradient through every layer, as when anything below the top is trained: same as HF's
        # enable_input_require_grads().
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        adapted = 0
    elif spec.kind == "full" or STRATEGY_KINDS.get(spec.kind, ("",))[0] == "full":
        model.requires_grad_(True)
        adapted = 0
    elif spec.kind in STRATEGY_KINDS:  # a strategy on splice LoRA r8 query/value
        import splice
        from splice.adapters.inject import adapter_layers

        model = splice.adapt(model, splice.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["query", "value"]))
        adapted = len(adapter_layers(model))
    elif spec.impl == "splice":
        import splice
        from splice.adapters.inject import adapter_layers

        config = lora_config(spec)
        model = splice.adapt(model, config, **calibration_for(config, model, head))
        adapted = len(adapter_layers(model))
        hooks = method_hooks(config, model)
    else:
        import peft
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = peft.get_peft_model(model, lora_config(spec))
        adapted = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
        if hasattr(model.base_model, "update_and_allocate"):  # AdaLoRA
            hooks = [PeftAdaLoraHook(model)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {"adapted_modules": adapted, "trainable_params": trainable, "hooks": [type(h).__name__ for h in hooks]}
    if spec.impl == "splice" and adapted:
        info["module_shapes"] = module_shapes(model)
    return model, info, hooks


class Trainer:
    """One configuration ready to step: model (train mode), head, AdamW over everything trainable (or, for a
    training strategy, the strategy's optimizer and its before/after-step hooks), and the method's own hooks
    (AdaLoRA, SORSA, SaRA, SpIEL, DyLoRA, IncreLoRA: a loss term, work after the optimizer step, the optimizer bound
    once), called where splice's training loop calls them (splice.train.loop.train_loop)."""

    def __init__(self, spec: Spec, batch: dict[str, torch.Tensor], model: nn.Module | None = None):
        torch.manual_seed(SEED)
        model = load_base() if model is None else model
        self.head = nn.Linear(model.config.hidden_size if hasattr(model, "config") else 384, 2)
        self.model, self.info, self.hooks = prepare(spec, model, self.head)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad] + list(self.head.parameters())
        self.strategy = None
        if spec.kind in STRATEGY_KINDS:
            from splice.train.optim.registry import build_strategy, make_strategy_config

            config = make_strategy_config(STRATEGY_KINDS[spec.kind][1])  # the strategy's defaults
            self.strategy = build_strategy(config, params, [self.model], total_steps=10**9, seed=SEED)
        # As the training loop: a strategy's optimizer, else a method hook's own (SpIEL's and IncreLoRA's AdamW
        # with an age per element), else torch's AdamW; torch's default weight decay 1e-2 in all.
        makers = [h.make_optimizer for h in self.hooks if hasattr(h, "make_optimizer")]
        made = (self.strategy.optimizer(params, 1e-4, 1e-2) if self.strategy
                else makers[0](params, 1e-4, 1e-2) if makers else None)
        self.opt = made or torch.optim.AdamW(params, lr=1e-4)
        for hook in self.hooks:  # a method that moves optimizer state (SpIEL's index updates) needs the optimizer
            if hasattr(hook, "bind_optimizer"):
                hook.bind_optimizer(self.opt)
        self.info["optimized_params"] = sum(p.numel() for p in params)  # the model's trainable ones + the head
        self.batch = batch
        self.steps = 0
        self.last_loss = float("nan")

    def step(self) -> dict[str, float]:
        b = self.batch
        t0 = time.perf_counter()
        if self.strategy:
            self.strategy.before_step(self.steps, self.opt)
        loss = classify_loss(self.model, self.head, b)
        for hook in self.hooks:
            if hasattr(hook, "loss"):
                loss = loss + hook.loss()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.opt.step()
        self.steps += 1
        for hook in self.hooks:  # after the optimizer step, while the gradients are there (1-based step)
            if hasattr(hook, "after_step"):
                hook.after_step(self.steps)
        if self.strategy:
            self.strategy.after_step(self.steps, self.opt)
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        self.last_loss = loss.item()
        return {"fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2}


# -- memory: one fresh process per configuration ---------------------------------------------------------------------
def memory_child(key: str, steps: int, threads: int) -> None:
    """Runs in the subprocess: prints one JSON line with RSS figures for configuration `key`."""
    torch.set_num_threads(threads)
    spec = Spec.parse(key)
    if spec.impl == "peft":
        import peft  # noqa: F401  (imported before the baseline, like splice and transformers)
    import splice  # noqa: F401
    import transformers  # noqa: F401

    rss_imports = common.rss_bytes()
    torch.manual_seed(SEED)
    model = load_base()
    batch = make_batch(model.config.vocab_size)
    rss_loaded = common.rss_bytes()
    reset = common.reset_peak_rss()
    trainer = Trainer(spec, batch, model=model)
    peak_setup = common.peak_rss_bytes()  # adapters built (and calibrated), optimizer made, before any step
    peaks = []
    for _ in range(steps):
        trainer.step()
        peaks.append(common.peak_rss_bytes())
    peak = peaks[-1]
    print("MEM " + json.dumps({"key": key, "rss_imports": rss_imports, "rss_loaded": rss_loaded, "peak": peak,
                               "rss_end": common.rss_bytes(), "peak_reset": reset, "loss": trainer.last_loss,
                               "digest": common.source_digest(ROOT / "src" / "splice"), "peak_per_step": peaks,
                               "peak_setup": peak_setup,
                               "strategy": trainer.strategy.summary() if trainer.strategy else None,
                               **trainer.info}), flush=True)


def measure_memory(specs: list[Spec], steps: int, threads: int, jobs: int, log) -> dict[str, dict]:
    """One fresh subprocess per configuration, `jobs` at a time (peak RSS is per process, so running two side by
    side changes only how long it takes)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(spec: Spec) -> tuple[str, dict, float]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_mem", spec.key, "--mem-steps", str(steps),
               "--threads", str(threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEM ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory subprocess for {spec.key} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return spec.key, json.loads(lines[-1][4:]), time.perf_counter() - t0

    out = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for i, (key, m, dt) in enumerate(pool.map(one, specs)):
            out[key] = m
            log(f"  [{i + 1}/{len(specs)}] {key:24s} peak {common.mib(m['peak'])} MiB, "
                f"+{common.mib(m['peak'] - m['rss_loaded'])} MiB over loaded ({dt:.0f} s)")
    return out


# -- inference -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_lora_B(model: nn.Module, seed: int) -> None:
    """B starts at 0; give every adapter a non-zero update so merged/mixed outputs differ from the base."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build_inference(batch: dict[str, torch.Tensor]) -> tuple[dict, dict[str, float]]:
    """The inference configurations as zero-argument runners, plus correctness checks (max abs differences)."""
    import peft
    import splice

    names = ["a", "b", "c"]
    rows = [names[i * 3 // BATCH] for i in range(BATCH)]  # sorted by adapter: 11 / 11 / 10 contiguous rows
    mixed_rows = [names[i % 3] for i in range(BATCH)]  # interleaved a, b, c, a, ... (an unsorted serving batch)
    cfg = dict(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    torch.manual_seed(SEED)
    base = load_base().eval()
    one = splice.adapt(load_base(), splice.LoraConfig(**cfg)).eval()
    randomize_lora_B(one, 1)
    merged = copy.deepcopy(one)
    splice.merge_adapter(merged, "default")
    three = load_base()
    for i, n in enumerate(names):
        splice.adapt(three, splice.LoraConfig(**cfg), adapter_name=n)
    three.eval()
    randomize_lora_B(three, 2)
    splice.set_adapter(three, "a")
    p_one = peft.get_peft_model(load_base(), peft.LoraConfig(**cfg)).eval()
    randomize_lora_B(p_one, 1)
    p_three = peft.get_peft_model(load_base(), peft.LoraConfig(**cfg), adapter_name="a")
    for n in names[1:]:
        p_three.add_adapter(n, peft.LoraConfig(**cfg))
    p_three.eval()
    randomize_lora_B(p_three, 2)

    def run(model, **kw):
        return model(**inputs, **kw).last_hidden_state

    def mixed(order=rows):
        with splice.mixed_batch(three, order):
            return run(three)

    runners = {
        "base model": lambda: run(base),
        "splice LoRA all-linear, unmerged": lambda: run(one),
        "splice LoRA all-linear, merged": lambda: run(merged),
        "splice 3 adapters, single-adapter batch": lambda: run(three),
        SORTED: mixed,
        INTERLEAVED: lambda: mixed(mixed_rows),
        "PEFT LoRA all-linear, unmerged": lambda: run(p_one),
        "PEFT 3 adapters, mixed batch, interleaved rows (adapter_names=)": lambda: run(p_three, adapter_names=mixed_rows),
    }

    checks = {}
    with torch.no_grad():
        checks["merged vs unmerged"] = (run(merged) - run(one)).abs().max().item()
        checks["unmerged vs base (should be > 0)"] = (run(one) - run(base)).abs().max().item()
        outs = {n: (splice.set_adapter(three, n), run(three))[1] for n in names}
        splice.set_adapter(three, "a")
        for label, order in (("sorted", rows), ("interleaved", mixed_rows)):
            out_mixed = mixed(order)
            checks[f"mixed batch ({label}) vs per-adapter batches"] = max(
                (out_mixed[i] - outs[n][i]).abs().max().item() for i, n in enumerate(order))
    return runners, checks


# -- profile ---------------------------------------------------------------------------------------------------------
def profile(threads: int, rows: int, specs: list[Spec] | None = None, reps: int = 3) -> None:
    """torch.profiler over `reps` steps per configuration, interleaved (steps disturbed by other processes are
    retried); per-op self CPU time is the median over the profiled steps. Default: LoRA/DoRA all-linear, splice and
    PEFT, against the floor; a method PEFT does not have is compared with its LoRA anchor."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    torch.set_num_threads(threads)
    base = load_base()
    batch = make_batch(base.config.vocab_size)
    del base
    specs = specs or [Spec("-", "floor")] + [Spec(impl, kind, d) for impl in ("splice", "peft")
                                             for kind in ("lora_all", "dora_all") for d in (0.1, 0.0)]
    trainers = {s.key: Trainer(s, batch) for s in specs}

    def profiled(tr):
        def run():
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                tr.step()
            return {"ops": {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}}
        return run

    walls = common.interleaved({k: tr.step for k, tr in trainers.items()}, reps, 1, 2, log=print)
    profs = common.interleaved({k: profiled(tr) for k, tr in trainers.items()}, reps, 1, 0, log=print)
    tables = {}
    for k, rounds in profs.items():
        reps_ = [c["ops"] for calls in rounds for c in calls]
        names = set().union(*reps_)
        tables[k] = {n: (statistics.median(r.get(n, (0.0, 0))[0] for r in reps_),
                         max(r.get(n, (0, 0))[1] for r in reps_)) for n in names}
    floor_wall = walls["floor"]
    for spec in specs:
        t = tables[spec.key]
        total = sum(v for v, _ in t.values())
        top = sorted(t.items(), key=lambda kv: -kv[1][0])[:rows]
        print(f"\n### {spec.label}, lora_dropout {spec.dropout:g}: unprofiled step median "
              f"{common.median_all(walls[spec.key]):.2f} s ({common.fmt_ratio(common.ratio_stats(walls[spec.key], floor_wall))}"
              f" floor); profiled self CPU {total / 1e3:.2f} s (median per op over {reps} profiled steps)\n")
        print(common.md_table(["op", "self CPU ms", "% of step", "calls"],
                              [[n, f"{v:.0f}", f"{100 * v / total:.1f}", c] for n, (v, c) in top]))
    for spec in specs[1:]:
        t = tables[spec.key]
        ref_key, ref_name = "floor", "the floor"
        if spec.kind in SPLICE_ONLY:
            ref_key, ref_name = Spec("splice", ANCHOR_OF[spec.kind], 0.0).key, "its LoRA anchor"
        floor = tables[ref_key]
        diff = sorted(((t.get(n, (0, 0))[0] - floor.get(n, (0, 0))[0], n) for n in set(t) | set(floor)),
                      reverse=True)
        print(f"\n### {spec.label}, lora_dropout {spec.dropout:g}, minus {ref_name}: largest extra self CPU\n")
        print(common.md_table(["op", "reference ms (calls)", "this ms (calls)", "extra ms"],
                              [[n, f"{floor.get(n, (0, 0))[0]:.0f} ({floor.get(n, (0, 0))[1]})",
                                f"{t.get(n, (0, 0))[0]:.0f} ({t.get(n, (0, 0))[1]})", f"{d:+.0f}"]
                               for d, n in diff[:rows]]))


# -- report ----------------------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def strategy_table(specs: list[Spec], timing: dict, memory: dict) -> str:
    """Each training strategy beside full fine-tuning: step time, memory increment, and the saving its mechanism
    implies: fp32 gradients + AdamW moments not held, 4 · (3 · N_full − (gradient + state numbers it holds))."""
    def inc(key: str) -> int:
        return memory[key]["peak"] - memory[key]["rss_loaded"]

    if "full" not in memory or not any(spec.kind in STRATEGY_KINDS for spec in specs):
        return ""
    rows = []
    full_inc, n_full = inc("full"), memory["full"]["optimized_params"]
    for spec in specs:
        if spec.kind not in STRATEGY_KINDS:
            continue
        on, _, label = STRATEGY_KINDS[spec.kind]
        m, summary = memory[spec.key], memory[spec.key].get("strategy") or {}
        held = summary.get("grad_floats", 0) + summary.get("state_floats", 0)
        per_step, every = summary.get("trained_params"), m.get("optimized_params", m["trainable_params"])
        cells = [label, f"{every:,}" + (f" ({per_step:,} per step)" if per_step and per_step != every else ""),
                 common.fmt_ratio(common.ratio_stats(timing[spec.key], timing["full"])),
                 common.mib(inc(spec.key))]
        if on == "full" and held:
            implied = 4 * (3 * n_full - held)
            saved = full_inc - inc(spec.key)
            cells += [f"{100 * saved / full_inc:.1f}% ({common.mib(saved)} MiB)",
                      f"{100 * implied / full_inc:.1f}% ({common.mib(implied)} MiB)", verdict(saved >= implied)]
        else:
            cells += ["—", "—", "—"]
        rows.append(cells)
    head = ("\n### Memory-efficient training strategies (splice.train.optim), beside full fine-tuning "
            f"(+{common.mib(full_inc)} MiB over loaded, {n_full:,} parameters)\n\n"
            "Implied saving: the fp32 gradients and AdamW moments the mechanism does not hold, "
            "4 B × (3 · N_full − the gradient and optimizer-state numbers the strategy reports); activations are "
            "not counted (LISA and HFT also skip the weight gradients of frozen layers, so they may save more). "
            "Verdict: measured saving ≥ implied.\n")
    return head + common.md_table(["configuration", "trained params (head included)", "step × full",
                                   "+ over loaded MiB", "measured saving vs full", "implied by the mechanism",
                                   "verdict"], rows)


def reason(kind: str) -> str:
    """The stated reason of a slow row: REASONS by kind, then by method; never a guess."""
    entry = kind_entry(kind)
    return REASONS.get(kind) or (REASONS.get(entry[1]) if isinstance(entry[1], str) else None) or "not analysed"


def slower_reason(kind: str, r: tuple) -> str:
    """A slow row's reason: the stated one, else, when some round had splice at least as fast (the per-round range
    reaches 1.00), that the run cannot tell the two apart; else "not analysed"."""
    stated = reason(kind)
    if stated == "not analysed" and r[1] <= 1.0:
        return f"not distinguishable in this run: the per-round ratio ranges {r[1]:.2f}–{r[2]:.2f}, across 1.00"
    return md_cell(stated)


def md_cell(text: str) -> str:
    """Text that survives a markdown table cell: | escaped (a formula's |w|, a regex's alternatives)."""
    return text.replace("|", "\\|")


def md_code(value) -> str:
    """A target_modules value as inline code in a markdown table cell."""
    return md_cell("`" + (value if isinstance(value, str) else ", ".join(value)) + "`")


def splice_only_table(specs: list[Spec], timing: dict, memory: dict) -> str:
    """The methods PEFT does not have, each beside splice LoRA r8 on the same targets (its anchor), grouped by
    targets: the parameter formula its config states, the count measured, and the step-time ratio to the anchor
    (median over rounds of the per-round ratio) against SPLICE_ONLY_LIMIT."""
    from splice.adapters.registry import get_method

    def inc(key: str) -> int:
        return memory[key]["peak"] - memory[key]["rss_loaded"]

    def cells(spec: Spec) -> list:
        m, s = memory[spec.key], timing[spec.key]
        return [f"{m['trainable_params']:,}", f"{common.median_all(s):.2f}",
                " / ".join(f"{common.median_all(s, k):.2f}" for k in ("fwd", "bwd", "opt"))]

    methods = [s for s in specs if s.kind in SPLICE_ONLY]
    if not methods:
        return ""
    rows = []
    for anchor_kind in dict.fromkeys(ANCHOR_OF[s.kind] for s in methods):
        anchor = Spec("splice", anchor_kind, 0.0)
        a_inc = inc(anchor.key)
        rows.append(["splice LoRA r8 (alpha 16) on the same targets", md_code(kind_entry(anchor_kind)[0]),
                     memory[anchor.key].get("module_shapes", ""), "r·(in + out)", *cells(anchor), "1.00×",
                     common.mib(a_inc), "", ""])
        for spec in methods:
            if ANCHOR_OF[spec.kind] != anchor_kind:
                continue
            method = SPLICE_ONLY[spec.kind][1]
            r = common.ratio_stats(timing[spec.key], timing[anchor.key])
            ok = r[0] <= SPLICE_ONLY_LIMIT
            formula = getattr(get_method(method).config, "params_formula", None) or "— (the config states none)"
            m = memory[spec.key]
            extra = " (peak at setup)" if m.get("peak_setup", 0) >= m["peak"] else ""
            hooks = m.get("hooks") or []
            name = f"**{method}**" + (f" ({', '.join(hooks)})" if hooks else "")
            rows.append([name, md_code(SPLICE_ONLY[spec.kind][0]), m.get("module_shapes", ""), md_cell(formula),
                         *cells(spec), common.fmt_ratio(r),
                         f"{common.mib(inc(spec.key))} ({(inc(spec.key) - a_inc) / 2**20:+,.0f}){extra}",
                         verdict(ok), "" if ok else md_cell(reason(spec.kind))])
    head = ("\n### Methods PEFT does not have (splice only), beside splice LoRA r8 on the same targets\n\n"
            "Each method with its config's defaults as the quality benchmark builds it (`splice.bench.arms.Arm."
            "adapter_config`: r=8, lora_alpha=16, lora_dropout 0 where the config has those fields), found through "
            "the registry; its anchor is splice LoRA r8 (lora_alpha 16, lora_dropout 0) on the same "
            "`target_modules`, timed in the same rounds. A method's training hook (named in brackets) runs as "
            "`splice train` runs it (its loss term added, `after_step` after the optimizer step, the optimizer "
            f"bound once), for a run of {RUN_STEPS} steps; a data-driven start gets calibration batches (random "
            "token ids and labels, as the timed batch). Params formula: the config's `params_formula`, per wrapped "
            "module, against the wrapped modules' shapes (in→out); the tests (tests/adapters/) check the count "
            "against it module by module. Memory: '+ over loaded' of the peak, and in brackets its difference "
            "to the anchor's; 'peak at setup' where it came before the first step (a data-driven start's "
            "calibration). "
            f"Verdict: step ≤ {SPLICE_ONLY_LIMIT}× the anchor's (median); a FAIL row states its reason (REASONS in "
            "bench/adapters.py) or says it was not analysed.\n\n")
    return head + common.md_table(["method (hooks)", "targets", "modules (in→out)", "params formula",
                                   "trainable params measured", "step s (median)", "fwd / bwd / opt s",
                                   "× LoRA on the same targets (median, range)",
                                   "+ over loaded MiB (vs the anchor)", "verdict", "reason"], rows)


def report(args, info, specs, timing, memory, inf_timing, checks, elapsed) -> str:
    floor = timing["floor"]
    dropouts = sorted({s.dropout for s in specs if s.impl != "-"}, reverse=True)
    out = []
    out.append("Model: all-MiniLM-L6-v2 (`transformers.AutoModel`, BertModel, 6 layers, hidden 384, attention "
               f"`{info.pop('_attn')}`) + mean pooling + Linear(384, 2); batch {BATCH} × sequence {SEQ} (random "
               "token ids, fixed seed, no padding); training step = forward + backward + AdamW step, model in "
               "train mode (BERT's own dropout 0.1 active in every row). Adapters: r=8, lora_alpha=16, same "
               "config for splice and PEFT; `lora_dropout` 0.1 is the main regime (PEFT's common recipe value), "
               "0.0 is shown too. The floor freezes every encoder weight but makes the input embeddings' output "
               "require grad, so backward runs through all layers; only the head trains.\n")
    out.append(common.md_table(["machine", ""], [[k, v] for k, v in info.items()]))
    inf = (f"inference: {args.inf_rounds} rounds × {args.inf_per_round} calls" if inf_timing
           else "no inference in this run")
    inf_stats = (f", inference {args.inf_stats['discarded']} / {args.inf_stats['calls']} "
                 f"({args.inf_stats['kept_under_load']})" if inf_timing else "")
    out.append(f"\nReproduce: `{args.command}` ({elapsed / 60:.1f} min). Speed: {args.rounds_done} rounds × "
               f"{args.per_round} timed step(s) per configuration after {args.warmup} warm-up step(s) ({inf}), "
               "configurations "
               "interleaved round-robin in a shuffled order each round; ratios are medians over rounds of the "
               "per-round ratio (range over rounds in brackets). A step during which other processes used more "
               "than 10% of the CPUs (from /proc/stat) was discarded and retried once the machine was quiet: "
               f"training {args.train_stats['discarded']} discarded / {args.train_stats['calls']} kept "
               f"({args.train_stats['kept_under_load']} kept under load after {1 if args.quick else 3} retries)"
               f"{inf_stats}. Memory: a fresh subprocess per configuration, "
               f"peak RSS (VmHWM{', reset after loading' if all(m.get('peak_reset') for m in memory.values()) else ''})"
               f" over {args.mem_steps} step(s); '+ over loaded' is peak minus the RSS right after loading the "
               "base model (adapters, gradients, optimizer state, activations).")

    # training table: floor, full, strategies and the methods PEFT has too (the others: their own table below)
    def mem_inc(key):
        m = memory[key]
        return m["peak"] - m["rss_loaded"]

    rows = []
    for spec in specs:
        if spec.kind in SPLICE_ONLY or spec.kind in ANCHOR_KINDS:
            continue
        s, m = timing[spec.key], memory[spec.key]
        peer = Spec("peft", spec.kind, spec.dropout).key if spec.impl == "splice" else None
        speed = mem = why = ""
        if peer in timing:
            r = common.ratio_stats(s, timing[peer])
            speed, mem = common.fmt_ratio(r), f"{mem_inc(spec.key) / mem_inc(peer):.2f}×"
            why = slower_reason(spec.kind, r) if r[0] > 1.0 else ""
        rows.append([
            spec.label, "—" if spec.impl == "-" or isinstance(KINDS[spec.kind][1], str) else f"{spec.dropout:g}",
            m["adapted_modules"] or "—",
            f"{m['trainable_params']:,}",
            f"{common.median_all(s):.2f}",
            " / ".join(f"{common.median_all(s, k):.2f}" for k in ("fwd", "bwd", "opt")),
            common.fmt_ratio(common.ratio_stats(s, floor)),
            speed, common.mib(m["peak"]), common.mib(mem_inc(spec.key)), mem, why,
        ])
    out.append("\n### Training step\n")
    out.append("splice ÷ PEFT: the step-time ratio (median over rounds of the per-round ratio, range in brackets) "
               "and the ratio of the '+ over loaded' memory; a row where splice is slower than PEFT (median > 1.00) "
               "states its reason (REASONS in bench/adapters.py), or that the run cannot tell the two apart (its "
               "per-round range crosses 1.00), or says it was not analysed. AdaLoRA runs its rank "
               f"allocation in both (splice's training hook; PEFT's `update_and_allocate` and orthogonal "
               f"regulariser) for a run of {RUN_STEPS} steps.\n")
    out.append(common.md_table(["configuration", "lora_dropout", "modules adapted", "trainable params",
                                "step s (median)", "fwd / bwd / opt s", "× floor", "splice ÷ PEFT step",
                                "peak RSS MiB", "+ over loaded MiB", "splice ÷ PEFT memory",
                                "reason (splice slower)"], rows))

    out += [t for t in (strategy_table(specs, timing, memory), splice_only_table(specs, timing, memory)) if t]

    # inference table
    if inf_timing:
        base_t = inf_timing["base model"]
        single = inf_timing["splice 3 adapters, single-adapter batch"]
        irows = [[name, f"{common.median_all(s) * 1e3:.0f}", common.fmt_ratio(common.ratio_stats(s, base_t)),
                  common.fmt_ratio(common.ratio_stats(s, single))] for name, s in inf_timing.items()]
        out.append("\n### Inference (eval, no_grad, batch 32 × 128)\n")
        out.append(common.md_table(["configuration", "ms (median)", "× base", "× splice single-adapter batch"],
                                   irows))
        out.append("\nCorrectness checks (max abs difference of last_hidden_state): "
                   + "; ".join(f"{k}: {v:.2e}" for k, v in checks.items()) + ".")
    else:
        out.append("\n_Inference not measured in this run (`--kinds` picks training configurations only)._")

    # targets (each where this run measured what it needs: `--kinds` may leave some out)
    trows = []
    for d in dropouts:
        k = lambda impl, kind: Spec(impl, kind, d).key  # noqa: E731
        if not {k(i, kind) for i in ("splice", "peft") for kind in ("lora_all", "dora_all")} <= timing.keys():
            continue
        r = common.ratio_stats(timing[k("splice", "lora_all")], floor)
        rp = common.ratio_stats(timing[k("peft", "lora_all")], floor)
        trows.append(["splice LoRA all-linear step ≤ 1.10× floor", f"{d:g}",
                      f"{common.fmt_ratio(r)} (PEFT: {rp[0]:.2f}×)", verdict(r[0] <= 1.10)])
        s_inc, p_inc = mem_inc(k("splice", "lora_all")), mem_inc(k("peft", "lora_all"))
        s_abs, p_abs = memory[k("splice", "lora_all")]["peak"], memory[k("peft", "lora_all")]["peak"]
        saving = 1 - s_inc / p_inc
        trows.append(["splice LoRA all-linear peak memory ≥ 15% below PEFT's", f"{d:g}",
                      f"{saving * 100:.1f}% below on the increment ({common.mib(s_inc)} vs {common.mib(p_inc)} MiB); "
                      f"{(1 - s_abs / p_abs) * 100:.1f}% on absolute peak ({common.mib(s_abs)} vs {common.mib(p_abs)})",
                      verdict(saving >= 0.15)])
        r = common.ratio_stats(timing[k("splice", "dora_all")], timing[k("peft", "dora_all")])
        trows.append(["splice DoRA all-linear step ≤ 0.85× PEFT DoRA's", f"{d:g}", common.fmt_ratio(r),
                      verdict(r[0] <= 0.85)])
        s_inc, p_inc = mem_inc(k("splice", "dora_all")), mem_inc(k("peft", "lora_all"))
        s_abs, p_abs = memory[k("splice", "dora_all")]["peak"], memory[k("peft", "lora_all")]["peak"]
        trows.append(["splice DoRA all-linear peak memory ≤ PEFT LoRA all-linear's", f"{d:g}",
                      f"increment {common.mib(s_inc)} vs {common.mib(p_inc)} MiB; "
                      f"absolute {common.mib(s_abs)} vs {common.mib(p_abs)} MiB", verdict(s_inc <= p_inc)])
    if inf_timing:
        r = common.ratio_stats(inf_timing["splice LoRA all-linear, merged"], base_t)
        trows.append(["merged inference ≤ 1.05× base latency", "eval", common.fmt_ratio(r), verdict(r[0] <= 1.05)])
        for label, key in (("rows sorted by adapter", SORTED), ("interleaved rows", INTERLEAVED)):
            r = common.ratio_stats(inf_timing[key], single)
            trows.append([f"mixed batch of 3 adapters ≤ 1.10× single-adapter batch ({label})", "eval",
                          common.fmt_ratio(r), verdict(r[0] <= 1.10)])
    methods = [spec for spec in specs if spec.kind in SPLICE_ONLY]
    if methods:
        fails = [SPLICE_ONLY[spec.kind][1] for spec in methods
                 if common.ratio_stats(timing[spec.key], timing[Spec("splice", ANCHOR_OF[spec.kind], 0.0).key])[0]
                 > SPLICE_ONLY_LIMIT]
        over = f"; over: {', '.join(fails)}" if fails else ""
        target = (f"methods PEFT does not have: step ≤ {SPLICE_ONLY_LIMIT}× LoRA's on the same targets, or the "
                  "reason stated")
        trows.append([target, "0", f"{len(methods) - len(fails)} of {len(methods)} within{over}",
                      verdict(all(reason(f"{f}_default") != "not analysed" for f in fails))])
    if trows:
        out.append("\n### Targets\n")
        out.append(common.md_table(["target", "lora_dropout", "measured", "verdict"], trows))
    digests = {m.get("digest") for m in memory.values()}
    if digests != {args.digest}:
        out.append(f"\n**Warning:** the splice sources changed during the run (digests {sorted(map(str, digests))} "
                   f"in the memory subprocesses vs {args.digest} for the timings); rerun on a quiet tree.")
    if any("memory" in row[0] for row in trows):
        out.append("\nMemory targets are judged on the increment over the loaded model (the part adapters, "
                   "gradients, optimizer state and activations add); the absolute peak is shown beside it.")
    if args.quick:
        out.append("\n_Smoke run (`--quick`): few rounds, numbers are indicative only._")
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: main dropout only, no query/value rows, of the methods PEFT does not have "
                    "only a sample (the first needing calibration, the first with a training hook, the first with "
                    "neither), 2 rounds, 2 memory steps")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown file to update (default bench/RESULTS.md)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--rounds", type=int, help="most timed training rounds (default 12; quick 2)")
    ap.add_argument("--budget", type=float, help="minutes for the timed training rounds, at least 3 rounds "
                    "(default 8; quick: no budget)")
    ap.add_argument("--per-round", type=int, help="timed steps per configuration per round (default 1)")
    ap.add_argument("--warmup", type=int, help="untimed steps per configuration first (default 2; quick 1)")
    ap.add_argument("--mem-steps", type=int, help="steps in each memory subprocess (default 5; quick 2)")
    ap.add_argument("--mem-jobs", type=int, default=2, help="memory subprocesses run side by side (default 2)")
    ap.add_argument("--dropouts", type=float, nargs="+", help="lora_dropout values (default 0.1 0.0; quick 0.1)")
    ap.add_argument("--kinds", help="comma-separated training configurations to run instead of the default set "
                    "(see --list-kinds), e.g. nola_default,lora_qv: the floor is always measured, a method PEFT does "
                    "not have brings its LoRA anchor, a strategy on full fine-tuning brings full; no inference "
                    "table then. With --profile: the configurations to profile")
    ap.add_argument("--list-kinds", action="store_true", help="print the names --kinds accepts and exit")
    ap.add_argument("--profile", action="store_true", help="profile LoRA/DoRA all-linear steps vs the floor (or "
                    "the --kinds configurations: a method PEFT does not have vs its LoRA anchor) and exit")
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--_mem", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._mem:
        memory_child(args._mem, args.mem_steps or 5, args.threads)
        return
    if args.list_kinds:
        print("\n".join(all_kinds()))
        return
    kinds = None
    if args.kinds:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip() and k.strip() != "floor"]
        unknown = [k for k in kinds if k not in all_kinds()]
        if unknown:
            ap.error(f"--kinds: unknown {', '.join(unknown)}; known: {', '.join(all_kinds())}")
    if args.profile:
        profile(args.threads, args.profile_rows, specs_for(args.dropouts or [0.1], kinds) if kinds else None)
        return

    q = args.quick
    args.rounds = args.rounds or (2 if q else 12)
    args.budget = args.budget if args.budget is not None else (None if q else 8.0)
    args.per_round = args.per_round or 1
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.mem_steps = args.mem_steps or (2 if q else 5)
    args.dropouts = args.dropouts or ([0.1] if q else [0.1, 0.0])
    args.command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd())] + sys.argv[1:])
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    import peft
    import transformers

    if kinds is None:
        kinds = (["lora_all", "dora_all", "full", *STRATEGY_KINDS, *quick_sample()] if q else all_kinds())
    specs = specs_for(args.dropouts, kinds)
    info = common.machine_info(args.threads)
    info["transformers"] = transformers.__version__
    info["peft"] = peft.__version__
    args.digest = common.source_digest(ROOT / "src" / "splice")
    info["splice sources (sha256 of src/splice/**/*.py)"] = args.digest

    log(f"training step timing: {len(specs)} configurations, {args.warmup} warm-up + {args.rounds} rounds × "
        f"{args.per_round} steps")
    base = load_base()
    info["_attn"] = getattr(base.config, "_attn_implementation", "?")
    batch = make_batch(base.config.vocab_size)
    del base
    trainers = {s.key: Trainer(s, batch) for s in specs}
    args.train_stats, args.inf_stats = {}, {}
    timing = common.interleaved({k: t.step for k, t in trainers.items()}, args.rounds, args.per_round, args.warmup,
                                log=log, budget_s=args.budget * 60 if args.budget else None, min_rounds=3,
                                stats=args.train_stats, retries=1 if q else 3, max_wait_s=10 if q else 45)
    args.rounds_done = len(timing["floor"])
    for k, t in trainers.items():
        if t.last_loss != t.last_loss:
            raise RuntimeError(f"{k}: loss is NaN")
    del trainers

    inf_timing, checks = {}, {}
    if not args.kinds:
        log("inference timing")
        runners, checks = build_inference(batch)
        with torch.no_grad():
            args.inf_rounds, args.inf_per_round = (2, 1) if q else (8, 2)
            inf_timing = common.interleaved(runners, args.inf_rounds, args.inf_per_round, 1 if q else 2, seed=1,
                                            log=log, stats=args.inf_stats, retries=1 if q else 3,
                                            max_wait_s=10 if q else 45)
        del runners

    log(f"peak memory: {len(specs)} subprocesses × {args.mem_steps} step(s)")
    memory = measure_memory(specs, args.mem_steps, args.threads, args.mem_jobs, log)

    body = report(args, info, specs, timing, memory, inf_timing, checks, time.perf_counter() - t_start)
    print(f"{HEADING}\n\n{body}")
    common.write_section(Path(args.out), HEADING, body)
    log(f"written to {args.out} ({(time.perf_counter() - t_start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
