"""The contract matrix: every (method, model kind, config) row must pass the same checks, with no per-method code.

Each row names a registered method, a tiny model family (tests/conftest.py) and the method's config fields. Before
any check the adapter's parameters are randomised (B and DoRA's magnitude included), so that the adapter is far from
the identity and a check that silently ignores it fails. All checks run in eval mode unless they say otherwise.

Tolerances (fp32):
- exact equality where the computation is the same (disabled adapters, a deleted adapter);
- 1e-5 absolute where the same weights run through a different code path (save → load, mixed batch, two adapters);
- 1e-4 × max(1, max|output|) where weights were folded into the base (merge, DeltaSet applied to a state dict);
- 1e-5 absolute on every base weight after merge → unmerge.

A method whose update is not a weight delta (its config's `has_delta` is False: bottleneck adapters) runs the same
rows; where a check needs the delta, the row checks instead that merge / merge_and_unload / get_delta refuse it with
one line naming the method and leave the model as it was.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import each_row_alone
from torch import nn
from torch.autograd import gradcheck

import splice
from splice.adapters import get_method, make_config
from splice.adapters.ops import lora_linear
from splice.adapters.registry import method_names


@dataclass(frozen=True)
class Row:
    id: str
    model: str  # a key of conftest.TINY
    method: str  # a registered method name
    fields: dict[str, Any] = field(default_factory=dict)

    def config(self):
        return make_config(self.method, **copy.deepcopy(self.fields))


ROWS = [
    Row("lora-bert-all-linear", "bert", "lora", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    Row("lora-bert-embedding", "bert", "lora", dict(r=4, lora_alpha=4, target_modules=["word_embeddings"])),
    Row("lora-gpt2-conv1d", "gpt2", "lora", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])),
    Row("lora-gpt2-conv1d-bias-lora-only", "gpt2", "lora",
        dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], bias="lora_only")),
    Row("lora-llama-rslora-dropout", "llama", "lora",
        dict(r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])),
    Row("lora-llama-gaussian-all-linear", "llama", "lora",
        dict(r=2, lora_alpha=16, init_lora_weights="gaussian", target_modules="all-linear")),
    Row("lora-cnn-conv2d", "cnn", "lora", dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2"])),
    Row("lora-bert-bias-all-modules-to-save", "bert", "lora",
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all", modules_to_save=["pooler.dense"])),
    Row("lora-llama-pissa", "llama", "lora",
        dict(r=4, lora_alpha=4, init_lora_weights="pissa", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    Row("lora-llama-olora", "llama", "lora",
        dict(r=4, lora_alpha=8, init_lora_weights="olora", target_modules=["q_proj", "v_proj", "gate_proj"])),
    Row("lora-gpt2-olora-conv1d", "gpt2", "lora", dict(r=2, lora_alpha=4, init_lora_weights="olora",
                                                     target_modules=["c_attn", "c_fc"])),
    # rho 1: no rank redistribution, whose ranks depend on the base the adapter is added to (test_inits.py)
    Row("lora-llama-eva", "llama", "lora", dict(r=4, lora_alpha=8, init_lora_weights="eva", eva_config={"rho": 1.0},
                                              target_modules=["q_proj", "o_proj", "up_proj"])),
    Row("lora-gpt2-lora-ga-conv1d", "gpt2", "lora",
        dict(r=2, lora_alpha=4, init_lora_weights="lora_ga", target_modules=["c_attn", "c_proj"])),
    Row("lora-llama-corda-kpm", "llama", "lora", dict(r=4, lora_alpha=8, init_lora_weights="corda",
                                                    corda_config={"corda_method": "kpm"},
                                                    target_modules=["q_proj", "v_proj", "down_proj"])),
    Row("dora-bert-all-linear", "bert", "dora", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    Row("dora-gpt2-conv1d", "gpt2", "dora", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])),
    Row("dora-llama", "llama", "dora",
        dict(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "gate_proj"])),
    Row("dora-cnn-head-modules-to-save", "cnn", "dora", dict(r=2, target_modules=["head"], modules_to_save=["conv2"])),
    Row("ia3-bert", "bert", "ia3",
        dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])),
    Row("ia3-gpt2-conv1d", "gpt2", "ia3",
        dict(target_modules=["c_attn", "c_fc", "c_proj"], feedforward_modules=["c_fc"])),
    Row("ia3-llama", "llama", "ia3",
        dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    Row("ia3-cnn-conv2d-modules-to-save", "cnn", "ia3",
        dict(target_modules=["conv1", "conv2"], feedforward_modules=["conv2"], modules_to_save=["head"])),
    Row("loha-bert-all-linear", "bert", "loha", dict(r=2, alpha=4, target_modules="all-linear")),
    Row("loha-llama-rank-dropout", "llama", "loha",
        dict(r=4, alpha=8, rank_dropout=0.2, target_modules=["q_proj", "v_proj", "down_proj"])),
    Row("loha-cnn-conv2d", "cnn", "loha", dict(r=2, alpha=2, target_modules=["conv1", "conv2", "head"])),
    Row("loha-cnn-effective-conv2d", "cnn", "loha",
        dict(r=2, alpha=4, use_effective_conv2d=True, target_modules=["conv1", "conv2"], modules_to_save=["head"])),
    Row("lokr-bert-all-linear", "bert", "lokr", dict(r=2, alpha=4, target_modules="all-linear")),
    Row("lokr-llama-decompose-both-factor", "llama", "lokr",
        dict(r=1, alpha=2, decompose_both=True, decompose_factor=8, rank_dropout=0.2, rank_dropout_scale=True,
             target_modules=["q_proj", "k_proj", "up_proj"])),
    Row("lokr-bert-full-factors-lycoris-init", "bert", "lokr",
        dict(r=8, alpha=8, init_weights="lycoris", target_modules=["query", "value"])),
    Row("lokr-cnn-conv2d", "cnn", "lokr", dict(r=1, alpha=2, target_modules=["conv1", "conv2", "head"])),
    Row("lokr-cnn-effective-conv2d", "cnn", "lokr",
        dict(r=1, alpha=2, use_effective_conv2d=True, target_modules=["conv1", "conv2"])),
    Row("vera-bert", "bert", "vera", dict(r=16, target_modules=["query", "value", "intermediate.dense"])),
    Row("vera-gpt2-conv1d-no-saved-projection", "gpt2", "vera",
        dict(r=8, projection_prng_key=3, save_projection=False, target_modules=["c_attn", "c_fc"])),
    Row("vera-llama-dropout", "llama", "vera",
        dict(r=64, vera_dropout=0.1, target_modules="all-linear", modules_to_save=["lm_head"])),
    Row("shira-bert-all-linear", "bert", "shira", dict(r=2, target_modules="all-linear")),
    Row("shira-llama-seeded", "llama", "shira", dict(r=4, random_seed=5, target_modules=["q_proj", "down_proj"],
                                                      modules_to_save=["lm_head"])),
    Row("fourierft-bert", "bert", "fourierft", dict(n_frequency=64, scaling=10.0, target_modules="all-linear")),
    Row("fourierft-gpt2-conv1d-pattern", "gpt2", "fourierft",
        dict(n_frequency=32, scaling=20.0, init_weights=True, n_frequency_pattern={"c_fc": 16},
             target_modules=["c_attn", "c_fc"])),
    Row("miss-bert-all-linear", "bert", "miss", dict(r=8, target_modules="all-linear")),
    Row("miss-llama-remainder-dropout", "llama", "miss",
        dict(r=5, miss_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])),
    Row("miss-bert-bat", "bert", "miss",
        dict(r=8, init_weights="bat", target_modules=["query", "intermediate.dense"])),
    Row("miss-llama-mini", "llama", "miss",
        dict(r=4, mini_r=8, init_weights="mini", target_modules=["o_proj", "up_proj"])),
    Row("adalora-bert-all-linear", "bert", "adalora", dict(init_r=6, target_r=4, total_step=10,
                                                            target_modules="all-linear")),
    Row("adalora-gpt2-conv1d-dropout", "gpt2", "adalora",
        dict(init_r=4, target_r=2, lora_alpha=16, lora_dropout=0.1, total_step=10,
             target_modules=["c_attn", "c_fc"], modules_to_save=["ln_f"])),
    Row("randlora-bert", "bert", "randlora",
        dict(r=8, randlora_alpha=16, target_modules=["query", "intermediate.dense"])),
    Row("randlora-gpt2-conv1d-no-saved-projection", "gpt2", "randlora",
        dict(r=16, randlora_alpha=32, save_projection=False, target_modules=["c_attn", "c_proj"])),
    Row("randlora-llama-sparse-dropout", "llama", "randlora",
        dict(r=8, randlora_alpha=16, sparse=True, randlora_dropout=0.1, target_modules="all-linear")),
    Row("oft-bert-all-linear", "bert", "oft", dict(oft_block_size=8, target_modules="all-linear")),
    Row("oft-llama-shared-exact-cayley", "llama", "oft",
        dict(r=4, oft_block_size=0, block_share=True, use_cayley_neumann=False,
             target_modules=["q_proj", "down_proj"])),
    Row("oft-llama-dropout", "llama", "oft", dict(oft_block_size=4, module_dropout=0.25, target_modules=["v_proj"])),
    Row("boft-bert-all-linear", "bert", "boft", dict(boft_block_size=4, target_modules="all-linear")),
    Row("boft-bert-butterfly-2", "bert", "boft",
        dict(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["query", "value", "output.dense"])),
    Row("boft-llama-block-num-butterfly-3-dropout", "llama", "boft",
        dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3, boft_dropout=0.25,
             target_modules=["q_proj", "down_proj"])),
    Row("boft-llama-block-num-modules-to-save", "llama", "boft",
        dict(boft_block_size=0, boft_block_num=8, target_modules=["k_proj", "up_proj"], modules_to_save=["lm_head"])),
    Row("bitfit-bert-all-linear", "bert", "bitfit", dict()),
    Row("bitfit-bert-layernorm-modules-to-save", "bert", "bitfit",
        dict(target_modules=["query", "LayerNorm"], modules_to_save=["pooler.dense"])),
    Row("bitfit-gpt2-conv1d", "gpt2", "bitfit", dict(target_modules=["c_attn", "c_fc", "ln_f"])),
    Row("bitfit-cnn-conv2d", "cnn", "bitfit", dict(target_modules=["conv1", "conv2", "head"])),
    Row("ln-tuning-bert", "bert", "ln_tuning", dict(target_modules=["LayerNorm"])),
    Row("ln-tuning-llama-rmsnorm", "llama", "ln_tuning", dict(target_modules=["input_layernorm", "norm"])),
    Row("ln-tuning-gpt2", "gpt2", "ln_tuning", dict(target_modules=["ln_1", "ln_2"], modules_to_save=["ln_f"])),
    # Bottleneck adapters are not a weight delta (has_delta False): their rows check the one-line refusal of merge,
    # merge_and_unload and get_delta instead, and that two active adapters add their changes module by module.
    Row("houlsby-bert", "bert", "houlsby", dict()),  # default targets; reduction 16 → m = 2 on the 32-wide model
    Row("houlsby-gpt2-conv1d-near-identity", "gpt2", "houlsby",
        dict(bottleneck_size=4, non_linearity="tanh", init_weights="near_identity")),
    Row("houlsby-llama-swish-dropout", "llama", "houlsby", dict(reduction_factor=4, non_linearity="swish",
                                                                dropout=0.1)),
    Row("pfeiffer-bert", "bert", "pfeiffer", dict()),
    Row("pfeiffer-llama-modules-to-save", "llama", "pfeiffer", dict(bottleneck_size=8, modules_to_save=["lm_head"])),
    Row("compacter-bert", "bert", "compacter", dict(reduction_factor=4)),  # m = 8, n = 4
    Row("compacter-gpt2-conv1d-rank2", "gpt2", "compacter", dict(bottleneck_size=4, phm_dim=2, phm_rank=2)),
    Row("compacter-llama-dropout", "llama", "compacter", dict(reduction_factor=4, dropout=0.1)),
    Row("ssf-bert-all-linear", "bert", "ssf", dict()),
    Row("ssf-bert-layernorm-paper-init", "bert", "ssf", dict(target_modules=["dense", "LayerNorm"],
                                                             init_weights="paper")),
    Row("ssf-gpt2-conv1d-ln", "gpt2", "ssf", dict(target_modules=["c_attn", "c_fc", "ln_1"])),
    Row("ssf-llama-where-bias", "llama", "ssf", dict(shift="where_bias")),  # no biases: γ only, and it merges
    Row("ssf-cnn-conv2d", "cnn", "ssf", dict(target_modules=["conv1", "conv2", "head"])),
    Row("dylora-bert-all-linear", "bert", "dylora", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    Row("dylora-gpt2-conv1d-eval-rank-frozen-dropout", "gpt2", "dylora",
        dict(r=4, r_min=2, eval_rank=3, frozen=True, lora_dropout=0.1, target_modules=["c_attn", "c_proj"],
             modules_to_save=["ln_f"])),
    Row("dylora-llama", "llama", "dylora", dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"])),
    Row("increlora-bert-all-linear", "bert", "increlora", dict(r=4, init_r=2, target_modules="all-linear")),
    Row("increlora-gpt2-conv1d-dropout-no-advance", "gpt2", "increlora",
        dict(r=2, init_r=1, max_r=4, rank_step=1, lora_dropout=0.1, advance_learning=False,
             target_modules=["c_attn", "c_fc"], modules_to_save=["ln_f"])),
    Row("increlora-llama", "llama", "increlora", dict(r=4, target_modules=["q_proj", "o_proj", "up_proj"])),
    Row("sara-bert-all-linear", "bert", "sara", dict(fraction=0.1, target_modules="all-linear")),
    Row("sara-gpt2-conv1d", "gpt2", "sara",
        dict(fraction=0.2, target_modules=["c_attn", "c_proj"], modules_to_save=["ln_f"])),
    Row("spiel-bert-all-linear", "bert", "spiel", dict(density=0.05)),
    Row("spiel-gpt2-conv1d", "gpt2", "spiel", dict(density=0.1, seed=3, target_modules=["c_attn", "c_fc"])),
    Row("s2ft-bert-columns", "bert", "s2ft", dict(ratio=0.25)),
    Row("s2ft-llama-heads-and-rows", "llama", "s2ft",
        dict(ratio=0.3, head_dim=16, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"])),
    Row("s2ft-gpt2-conv1d-heads-and-rows", "gpt2", "s2ft",
        dict(ratio=0.2, head_dim=16, target_modules=["c_attn", "c_proj", "c_fc"])),
    Row("paca-bert-all-linear", "bert", "paca", dict(r=4, target_modules="all-linear")),
    Row("paca-gpt2-conv1d", "gpt2", "paca", dict(r=4, paca_alpha=8, target_modules=["c_attn", "c_proj"])),
    Row("paca-llama-modules-to-save", "llama", "paca",
        dict(r=2, target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"])),
    Row("nola-bert", "bert", "nola",
        dict(r=4, num_basis_A=64, num_basis_B=32, target_modules=["query", "value", "intermediate.dense"])),
    Row("nola-gpt2-conv1d", "gpt2", "nola",
        dict(r=4, num_basis_A=32, num_basis_B=64, lora_alpha=8, seed=3, target_modules=["c_attn", "c_fc"])),
    Row("svfit-bert-all-linear", "bert", "svfit", dict(r=4, target_modules="all-linear")),
    Row("svfit-gpt2-conv1d", "gpt2", "svfit", dict(r=8, target_modules=["c_attn", "c_proj"])),
    Row("sorsa-bert", "bert", "sorsa", dict(r=4, target_modules=["query", "value", "intermediate.dense"])),
    Row("sorsa-gpt2-conv1d-modules-to-save", "gpt2", "sorsa",
        dict(r=2, gamma=0.1, target_modules=["c_attn", "c_fc"], modules_to_save=["ln_f"])),
    Row("svft-bert-plain-all-linear", "bert", "svft", dict(target_modules="all-linear")),
    Row("svft-bert-banded-top-rank", "bert", "svft",
        dict(pattern="banded", off_diag=2, rank=16, target_modules=["query", "output.dense"])),
    Row("svft-gpt2-conv1d-random-saved-vectors", "gpt2", "svft",
        dict(pattern="random", k=64, random_seed=3, save_singular_vectors=True, target_modules=["c_attn", "c_fc"])),
    Row("svft-llama-top-k", "llama", "svft", dict(pattern="top_k", k=40, target_modules=["q_proj", "o_proj"])),
    Row("loldu-bert-all-linear", "bert", "loldu", dict(r=4, target_modules="all-linear")),
    Row("loldu-gpt2-conv1d", "gpt2", "loldu", dict(r=8, lora_alpha=4, target_modules=["c_attn", "c_proj"])),
    Row("lora-sb-bert-svd-all-linear", "bert", "lora_sb", dict(r=4, init_weights="svd", target_modules="all-linear")),
    Row("lora-sb-llama-gradient", "llama", "lora_sb",
        dict(r=4, init_weights="gradient", target_modules=["q_proj", "v_proj", "down_proj"])),
    Row("lora-sb-gpt2-conv1d-auto-sgd", "gpt2", "lora_sb",
        dict(r=2, update="sgd", init_lr=0.1, target_modules=["c_attn", "c_fc"])),
]
rows = pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])


def test_every_method_has_a_row():
    # prompt methods (no weight delta) have their own matrix: test_prompt_contract.py
    from splice.adapters.prompts import PromptConfig
    weight_methods = {m for m in method_names() if not issubclass(get_method(m).config, PromptConfig)}
    assert {r.method for r in ROWS} == weight_methods


# -- helpers (method-agnostic) -------------------------------------------------------------------------------------
@torch.no_grad()
def randomise(model: nn.Module, name: str, seed: int) -> None:
    """Move every parameter of adapter `name` away from its initial value (zeros become N(0, 0.1²), others get 10%
    relative noise), so B ≠ 0, DoRA's magnitude ≠ ‖W‖ and a trained bias ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    params = splice.trainable_parameters(model, name)
    assert params, f"adapter {name!r} has no parameters"
    for p in params:
        size = p.abs().mean().item()
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.add_(noise * (0.1 * size if size > 0 else 0.1))


def add_adapter(model: nn.Module, row: Row, name: str = "default", seed: int = 1) -> nn.Module:
    """Adapt `model` with `row`'s config as adapter `name`; the result depends on `seed` only."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        splice.adapt(model, row.config(), name, **calibration(model, row))
    randomise(model, name, seed)
    return model


def calibration(model: nn.Module, row: Row) -> dict[str, Any]:
    """Two batches of token ids (labels = inputs) for the rows of a data-driven init (eva, lora_ga, corda, LoRA-SB)."""
    if not row.config().needs_calibration:
        return {}
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, model.config.vocab_size, (2, 4, 6), generator=g)
    return {"calibration": [{"input_ids": x, "labels": x} for x in ids]}


def has_delta(row: Row) -> bool:
    """Whether the row's method is a weight delta; a row whose method is not checks the refusals instead."""
    return get_method(row.method).config.has_delta


def assert_not_a_delta(call, row: Row) -> None:
    """`call` raises the one line that names the method and says it is not a weight delta."""
    with pytest.raises(splice.SpliceError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{row.method} adapters are not a weight delta: they cannot be ")
    assert msg.endswith("; serve or train them as they are")


def close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def merge_tol(ref: torch.Tensor) -> float:
    return 1e-4 * max(1.0, ref.abs().max().item())


def module_types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


def setup(tiny, row: Row):
    fam = tiny[row.model]
    model = fam.build()
    base_out = fam.output(model)
    add_adapter(model, row)
    return fam, model, base_out


# -- the contract --------------------------------------------------------------------------------------------------
@rows
def test_adapter_is_not_identity_and_model_stays_in_eval(tiny, row):
    fam, model, base_out = setup(tiny, row)
    # adapt() on an eval model must not switch dropout on in the new layers.
    assert not any(m.training for m in model.modules())
    out = fam.output(model)
    assert (out - base_out).abs().max() > 1e-3
    assert splice.active_adapters(model) == ["default"]


@rows
def test_save_load_gives_identical_outputs(tiny, row, tmp_path):
    fam, model, _ = setup(tiny, row)
    path = splice.save_adapter(model, tmp_path / "adapter", "default")
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    fresh = fam.build()
    splice.load_adapter(fresh, path)
    close(fam.output(fresh), fam.output(model), atol=1e-5)
    # loaded for inference: nothing trains, and the loaded model stays in eval mode
    assert not any(p.requires_grad for p in fresh.parameters())
    assert not any(m.training for m in fresh.modules())

    trainable = fam.build()
    splice.load_adapter(trainable, path, is_trainable=True)
    want = {id(p) for p in splice.trainable_parameters(trainable, "default")}
    assert want and want == {id(p) for p in trainable.parameters() if p.requires_grad}


@rows
def test_merge_keeps_outputs_and_unmerge_restores_base_weights(tiny, row):
    fam = tiny[row.model]
    model = fam.build()
    params = dict(model.named_parameters())  # the base's own Parameter objects: wrapping keeps them by reference
    before = {n: p.detach().clone() for n, p in params.items()}
    add_adapter(model, row)
    out = fam.output(model)
    if not has_delta(row):  # refused before any module is touched
        assert_not_a_delta(lambda: splice.merge_adapter(model, "default"), row)
        assert all(torch.equal(p, before[n]) for n, p in params.items())
        assert torch.equal(fam.output(model), out)
        return

    splice.merge_adapter(model, "default")
    close(fam.output(model), out, atol=merge_tol(out))
    changed = max((params[n] - before[n]).abs().max().item() for n in params)
    assert changed > 1e-4, "merge did not change any base weight"

    splice.unmerge_adapter(model, "default")
    for n, p in params.items():
        assert (p - before[n]).abs().max().item() <= 1e-5, f"{n} not restored by unmerge"
    close(fam.output(model), out, atol=merge_tol(out))


@rows
def test_merge_and_unload_gives_plain_model_with_same_outputs(tiny, row):
    fam = tiny[row.model]
    model = fam.build()
    types = module_types(model)
    add_adapter(model, row)
    out = fam.output(model)
    if not has_delta(row):  # refused, and the model keeps its adapter
        assert_not_a_delta(lambda: splice.merge_and_unload(model), row)
        assert module_types(model) != types and splice.active_adapters(model) == ["default"]
        assert torch.equal(fam.output(model), out)
        return
    merged = splice.merge_and_unload(model)
    assert module_types(merged) == types
    close(fam.output(merged), out, atol=merge_tol(out))


@rows
def test_disabled_adapters_give_exact_base_outputs(tiny, row):
    fam, model, base_out = setup(tiny, row)
    with splice.disable_adapters(model):
        assert torch.equal(fam.output(model), base_out)
    assert (fam.output(model) - base_out).abs().max() > 1e-3  # enabled again on exit


@rows
def test_two_adapters_each_give_their_own_outputs(tiny, row):
    fam = tiny[row.model]
    model = add_adapter(add_adapter(fam.build(), row, "a", seed=1), row, "b", seed=2)
    only_a = fam.output(add_adapter(fam.build(), row, "a", seed=1))
    only_b = fam.output(add_adapter(fam.build(), row, "b", seed=2))
    assert (only_a - only_b).abs().max() > 1e-3

    assert splice.active_adapters(model) == ["b"]  # the last one added is active
    close(fam.output(model), only_b, atol=1e-5)
    splice.set_adapter(model, "a")
    close(fam.output(model), only_a, atol=1e-5)
    splice.set_adapter(model, "b")
    close(fam.output(model), only_b, atol=1e-5)

    splice.delete_adapter(model, "b")
    assert splice.active_adapters(model) == []
    splice.set_adapter(model, "a")
    close(fam.output(model), only_a, atol=1e-5)


@rows
def test_two_active_adapters_add_their_deltas(tiny, row):
    """With both active, each module adds both contributions: the base with both DeltaSets applied."""
    fam = tiny[row.model]
    model = add_adapter(add_adapter(fam.build(), row, "a", seed=1), row, "b", seed=2)
    splice.set_adapter(model, ["a", "b"])
    assert splice.active_adapters(model) == ["a", "b"]
    out = fam.output(model)
    if not has_delta(row):
        each_module_adds_both_changes(fam, model)
        return
    base = fam.build()
    state = base.state_dict()
    original = {k: v.clone() for k, v in state.items()}
    # Each delta is measured against the original base and both are added (for additive forms the same as applying
    # one after the other; a multiplicative Scale applied twice would compound instead of add).
    with torch.no_grad():
        for name_ in ("a", "b"):
            for tensor, d in splice.get_delta(model, name_).items():
                state[tensor] += d.materialize(original[tensor]).reshape(state[tensor].shape)
    base.load_state_dict(state)
    close(fam.output(base), out, atol=merge_tol(out))


def each_module_adds_both_changes(fam, model: nn.Module) -> None:
    """With adapters a and b active, every wrapped module's output is base + (a's change) + (b's change), on the
    inputs that module sees in a forward of the model (for methods with no DeltaSet to compare against)."""
    from splice.adapters.inject import adapter_layers

    seen: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, path=path: seen.setdefault(path, args[0]))
             for path, layer in adapter_layers(model)]
    fam.output(model)
    for h in hooks:
        h.remove()
    assert seen
    with torch.no_grad():
        for path, x in seen.items():
            layer = model.get_submodule(path)
            both = layer(x)
            layer.disabled = True
            base = layer(x)
            layer.disabled = False
            alone = []
            for name in ("a", "b"):
                layer.active = [name]
                alone.append(layer(x))
            layer.active = ["a", "b"]
            close(both, alone[0] + alone[1] - base, atol=1e-5)


@rows
def test_adapter_on_top_of_a_merged_adapter(tiny, row):
    """Merging "a" changes the base weights under "b": "b" must then act as it would on a base that has a's delta,
    e.g. DoRA's row norms must be those of the new weights."""
    fam = tiny[row.model]
    model = add_adapter(add_adapter(fam.build(), row, "a", seed=1), row, "b", seed=2)
    if not has_delta(row):  # a cannot be merged; b, active, still gives its own outputs
        assert_not_a_delta(lambda: splice.merge_adapter(model, "a"), row)
        splice.set_adapter(model, "b")
        close(fam.output(model), fam.output(add_adapter(fam.build(), row, "b", seed=2)), atol=1e-5)
        return
    delta_a = splice.get_delta(model, "a")
    splice.merge_adapter(model, "a")
    splice.set_adapter(model, "b")
    out = fam.output(model)

    ref = fam.build()
    state = ref.state_dict()
    delta_a.apply_to_state_dict(state)
    ref.load_state_dict(state)
    add_adapter(ref, row, "b", seed=2)
    b_state = {k: v for k, v in model.state_dict().items() if ".adapters.b." in k}  # b's own weights, exactly
    assert not ref.load_state_dict(b_state, strict=False).unexpected_keys
    close(fam.output(ref), out, atol=merge_tol(out))

    splice.unmerge_adapter(model, "a")  # and back: b on the original base again
    close(fam.output(model), fam.output(add_adapter(fam.build(), row, "b", seed=2)), atol=merge_tol(out))


@rows
@pytest.mark.parametrize("names", [["a", "b", None, "a"], ["a", "a", "b", None]], ids=["scattered", "sorted"])
def test_mixed_batch_equals_each_row_alone(tiny, row, names):
    # scattered rows take the gather/scatter path, sorted ones the contiguous-slice path
    fam = tiny[row.model]
    model = add_adapter(add_adapter(fam.build(), row, "a", seed=1), row, "b", seed=2)
    batch = fam.batch(rows=4)
    with splice.mixed_batch(model, names):
        mixed = fam.output(model, batch)
    for i, alone in enumerate(each_row_alone(fam, model, batch, names)):
        close(mixed[i:i + 1], alone, atol=1e-5)


@rows
def test_get_delta_applied_to_base_state_dict_gives_adapted_outputs(tiny, row):
    fam, model, _ = setup(tiny, row)
    out = fam.output(model)
    if not has_delta(row):
        assert_not_a_delta(lambda: splice.get_delta(model, "default"), row)
        return
    delta = splice.get_delta(model, "default")
    assert len(delta) > 0 and delta.method == row.method
    base = fam.build()
    state = base.state_dict()
    delta.apply_to_state_dict(state)
    base.load_state_dict(state)
    close(fam.output(base), out, atol=merge_tol(out))


@rows
def test_delete_adapter_restores_module_types_and_outputs(tiny, row):
    fam = tiny[row.model]
    model = fam.build()
    types, base_out = module_types(model), fam.output(model)
    add_adapter(model, row)
    assert module_types(model) != types
    splice.delete_adapter(model, "default")
    assert module_types(model) == types
    assert torch.equal(fam.output(model), base_out)
    assert splice.active_adapters(model) == []


@rows
def test_backward_reaches_exactly_the_adapter_parameters(tiny, row):
    fam, model, _ = setup(tiny, row)
    model.train()
    out = fam.run(model, fam.batch())
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * weights).sum().backward()
    adapter = splice.trainable_parameters(model, "default")
    assert {id(p) for p in adapter} == {id(p) for p in model.parameters() if p.requires_grad}
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == {id(p) for p in adapter}
    for p in adapter:
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0


# -- unsupported combinations --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name, target", [("bert", ["word_embeddings"]), ("cnn", ["conv1"]),
                                                ("gpt2", ["wte"])])
def test_dora_refuses_embedding_and_conv2d(tiny, model_name, target):
    model = tiny[model_name].build()
    types = module_types(model)
    with pytest.raises(splice.SpliceError) as info:
        splice.adapt(model, splice.DoraConfig(r=2, target_modules=target))
    msg = str(info.value)
    assert "\n" not in msg and "dora" in msg and ("Embedding" in msg or "Conv2d" in msg)
    # refused before touching the model: nothing wrapped, nothing frozen, no adapter recorded
    assert module_types(model) == types
    assert all(p.requires_grad for p in model.parameters())
    assert splice.active_adapters(model) == []


def test_refused_adapt_half_way_leaves_model_untouched_and_retry_works(tiny):
    """The first target (a linear layer) is fine, the second (an embedding) is refused by DoRA."""
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(8, 8))
    model.add_module("emb", nn.Embedding(10, 8))
    types = module_types(model)
    with pytest.raises(splice.SpliceError):
        splice.adapt(model, splice.DoraConfig(r=2, target_modules=["proj", "emb"]))
    assert module_types(model) == types
    assert all(p.requires_grad for p in model.parameters())
    splice.adapt(model, splice.DoraConfig(r=2, target_modules=["proj"]))  # the same name is free to use again
    assert splice.active_adapters(model) == ["default"]


# -- the fused op against a plain autograd reference ---------------------------------------------------------------
def reference(x, W, b, A, B, s, m=None):
    """PEFT's formula: F.linear + s·(x Aᵀ) Bᵀ, and DoRA's m/‖W + sBA‖_row rescaling with the norm detached."""
    z = F.linear(x, W) + (x @ A.t()) @ B.t() * s
    if m is not None:
        norm = (W + s * B @ A).norm(dim=1).detach()
        z = z * (m / norm)
    return z if b is None else z + b


def op_inputs(dtype, bias: bool, dora: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, positive=False):
        v = torch.randn(*shape, generator=g, dtype=dtype)
        return (v.abs() + 0.5 if positive else v).requires_grad_(True)

    x, W, A, B = t(2, 3, 5), t(4, 5), t(2, 5), t(4, 2)
    return x, W, t(4) if bias else None, A, B, t(4, positive=True) if dora else None


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "factored"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_op_gradcheck_float64(bias, dora, p, fold):
    """With dropout the RNG is reseeded on every call, so the function gradcheck probes is deterministic and the
    backward must use the forward's own mask and 1/(1-p) scaling. DoRA's norm depends on W, A and B but is a
    constant in backward by design (paper §4.3), which finite differences cannot see: for DoRA, gradcheck probes
    x, b and m, and the A/B gradients are checked against the detached-norm reference in the next test."""
    x, W, b, A, B, m = op_inputs(torch.float64, bias, dora)
    if dora:
        for t in (W, A, B):
            t.requires_grad_(False)
    s = 1.7
    inputs = tuple(t for t in (x, W, b, A, B, m) if t is not None)

    def fused(*args):
        it = iter(args)
        x_, W_ = next(it), next(it)
        b_ = next(it) if bias else None
        A_, B_ = next(it), next(it)
        m_ = next(it) if dora else None
        torch.manual_seed(0)
        return lora_linear(x_, W_, b_, A_, B_, s, p, magnitude=m_, fold=fold)

    assert gradcheck(fused, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("fold", [True, False, None], ids=["folded", "factored", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_op_matches_plain_autograd(bias, dora, dtype, fold):
    s = 0.8
    ours = op_inputs(dtype, bias, dora, seed=3)
    ref = op_inputs(dtype, bias, dora, seed=3)
    x, W, b, A, B, m = ours
    y = lora_linear(x, W, b, A, B, s, 0.0, magnitude=m, fold=fold)
    y_ref = reference(*ref[:5], s, ref[5])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    y.backward(g)
    y_ref.backward(g)
    for name, t, r in zip("x W b A B m".split(), ours, ref):
        if t is not None:
            torch.testing.assert_close(t.grad, r.grad, atol=tol, rtol=tol, msg=f"grad of {name}")
