"""Parity with the installed PEFT (the reference implementation), both ways, on the same weights.

For every row: PEFT builds the adapter, its weights are randomised (B, DoRA's magnitude and modules_to_save copies
included, so that nothing is the identity), and then

- PEFT `save_pretrained` → `splice.load_adapter` into a fresh base → the same outputs;
- `splice.save_adapter` → `peft.PeftModel.from_pretrained` on a fresh base → the same outputs;
- PEFT `merge_and_unload()` and splice `merge_and_unload` give the same weights.

Tolerance: 1e-5 absolute on outputs and on merged weights (fp32; outputs of these models are O(0.1–1)).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import splice
from splice.adapters import make_config
from splice.errors import SpliceError

ATOL = 1e-5


# splice method → PEFT's config class for it (DoRA is PEFT's LoRA with use_dora).
PEFT_CONFIGS = {"lora": peft.LoraConfig, "dora": peft.LoraConfig, "ia3": peft.IA3Config, "loha": peft.LoHaConfig,
                "lokr": peft.LoKrConfig, "vera": peft.VeraConfig, "ln_tuning": peft.LNTuningConfig,
                "shira": peft.ShiraConfig, "fourierft": peft.FourierFTConfig,
                "miss": peft.MissConfig, "adalora": peft.AdaLoraConfig,
                "randlora": peft.RandLoraConfig, "oft": peft.OFTConfig, "boft": peft.BOFTConfig}


@pytest.fixture(autouse=True)
def peft_boft_block_diag(monkeypatch):
    """PEFT's BOFT builds its block-diagonal matrices with a CUDA extension and, where that cannot be compiled (a
    CPU-only torch), quietly uses one butterfly factor whatever the config says. A plain-torch stand-in for the
    extension (the same (N, D, b, b) → (N, D·b, D·b) block-diagonal, and its backward) makes PEFT run the butterfly
    its config asks for, so that the rows with several factors compare against PEFT's own construction."""
    import peft.tuners.boft.layer as boft_layer

    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    def backward(grad, blocks):
        n, d, b, _ = blocks.shape
        idx = torch.arange(d)
        return [grad.view(n, d, b, d, b)[:, idx, :, idx, :].transpose(0, 1)]

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", type("FastBlockDiag", (), {"forward": staticmethod(forward),
                                                                            "backward": staticmethod(backward)}))


@dataclass(frozen=True)
class Row:
    id: str
    model: str  # a key of conftest.TINY
    kwargs: dict[str, Any] = field(default_factory=dict)  # fields of PEFT's config for the method
    method: str = "lora"  # splice's method name (a row with use_dora=True is "dora")

    @property
    def splice_method(self) -> str:
        return "dora" if self.kwargs.get("use_dora") else self.method

    def peft_config(self) -> peft.PeftConfig:
        return PEFT_CONFIGS[self.splice_method](**copy.deepcopy(self.kwargs))

    def splice_config(self):
        kw = copy.deepcopy(self.kwargs)
        kw.pop("fan_in_fan_out", None)  # PEFT's flag for GPT-2's Conv1D; splice sees the module type
        kw.pop("use_dora", None)
        return make_config(self.splice_method, **kw)


GPT2 = dict(fan_in_fan_out=True)
ROWS = [
    Row("lora-bert-alpha-ne-r", "bert", dict(r=4, lora_alpha=16, target_modules=["query", "value"])),
    Row("lora-bert-all-linear", "bert", dict(r=2, lora_alpha=4, target_modules="all-linear")),
    Row("lora-bert-rslora", "bert", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["key", "dense"])),
    Row("lora-bert-embedding", "bert", dict(r=4, lora_alpha=8, target_modules=["word_embeddings", "query"])),
    Row("lora-bert-modules-to-save", "bert",
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["pooler.dense"])),
    Row("lora-llama", "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])),
    Row("lora-llama-rslora-dropout", "llama",
        dict(r=8, lora_alpha=4, use_rslora=True, lora_dropout=0.1, target_modules=["q_proj", "up_proj"])),
    Row("lora-gpt2-conv1d", "gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], **GPT2)),
    Row("lora-cnn-conv2d", "cnn", dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "head"])),
    Row("lora-cnn-modules-to-save", "cnn", dict(r=2, lora_alpha=2, target_modules=["conv2"], modules_to_save=["head"])),
    Row("lora-bert-bias-all", "bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all")),
    Row("lora-gpt2-bias-lora-only", "gpt2",
        dict(r=2, lora_alpha=8, target_modules=["c_attn", "c_fc"], bias="lora_only", **GPT2)),
    Row("lora-cnn-bias-lora-only", "cnn", dict(r=2, lora_alpha=4, target_modules=["conv1", "head"], bias="lora_only")),
    Row("dora-bert", "bert", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["query", "value", "dense"])),
    Row("dora-bert-rslora", "bert", dict(r=4, lora_alpha=16, use_dora=True, use_rslora=True,
                                         target_modules=["key"], modules_to_save=["pooler.dense"])),
    Row("dora-bert-bias-all", "bert", dict(r=2, lora_alpha=4, use_dora=True, target_modules=["value"], bias="all")),
    Row("dora-llama", "llama",
        dict(r=4, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])),
    Row("dora-gpt2-conv1d", "gpt2",
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_proj"], **GPT2)),
    Row("ia3-bert", "bert", dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
        "ia3"),
    Row("ia3-bert-modules-to-save", "bert",
        dict(target_modules=["query", "intermediate.dense"], feedforward_modules=["intermediate.dense"],
             modules_to_save=["pooler.dense"]), "ia3"),
    # No feedforward_modules: both libraries pick the architecture's (BERT: output.dense), here among the targets.
    Row("ia3-bert-feedforward-unset", "bert", dict(target_modules=["value", "output.dense"]), "ia3"),
    Row("ia3-llama-unset", "llama", {}, "ia3"),
    Row("ia3-gpt2-unset", "gpt2", dict(**GPT2), "ia3"),
    Row("ia3-llama", "llama",
        dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), "ia3"),
    Row("ia3-gpt2-conv1d", "gpt2",
        dict(target_modules=["c_attn", "c_fc", "c_proj"], feedforward_modules=["c_fc"], **GPT2), "ia3"),
    Row("ia3-cnn-conv2d", "cnn", dict(target_modules=["conv1", "conv2", "head"], feedforward_modules=["conv2"]),
        "ia3"),
    Row("loha-bert", "bert", dict(r=2, alpha=4, target_modules=["query", "value", "dense"]), "loha"),
    Row("loha-llama-patterns", "llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}), "loha"),
    Row("loha-cnn-conv2d", "cnn", dict(r=2, alpha=2, target_modules=["conv1", "conv2", "head"]), "loha"),
    Row("loha-cnn-effective-conv2d", "cnn",
        dict(r=2, alpha=4, use_effective_conv2d=True, target_modules=["conv1", "conv2"], modules_to_save=["head"]),
        "loha"),
    Row("lokr-bert", "bert", dict(r=2, alpha=4, target_modules=["query", "value", "dense"]), "lokr"),
    Row("lokr-bert-full-factors", "bert", dict(r=8, alpha=8, target_modules=["key"]), "lokr"),
    Row("lokr-llama-decompose-both-factor", "llama",
        dict(r=1, alpha=2, decompose_both=True, decompose_factor=8, target_modules=["q_proj", "k_proj", "up_proj"],
             rank_pattern={"up_proj": 2}), "lokr"),
    Row("lokr-cnn-conv2d", "cnn", dict(r=1, alpha=2, target_modules=["conv1", "conv2", "head"]), "lokr"),
    Row("lokr-cnn-effective-conv2d", "cnn",
        dict(r=1, alpha=2, use_effective_conv2d=True, target_modules=["conv1", "conv2"]), "lokr"),
    Row("vera-bert", "bert", dict(r=16, target_modules=["query", "value", "intermediate.dense"]), "vera"),
    Row("vera-bert-no-saved-projection", "bert",
        dict(r=8, projection_prng_key=7, save_projection=False, target_modules=["key", "output.dense"],
             modules_to_save=["pooler.dense"]), "vera"),
    Row("vera-llama", "llama", dict(r=32, d_initial=0.5, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
        "vera"),
    Row("vera-gpt2-conv1d", "gpt2", dict(r=8, target_modules=["c_attn", "c_proj"], **GPT2), "vera"),
    Row("shira-bert", "bert", dict(r=2, target_modules=["query", "value", "intermediate.dense"]), "shira"),
    Row("shira-llama-seeded", "llama", dict(r=4, random_seed=11, target_modules=["k_proj", "up_proj", "down_proj"],
                                            modules_to_save=["lm_head"]), "shira"),
    Row("fourierft-bert", "bert", dict(n_frequency=64, scaling=10.0, target_modules=["query", "intermediate.dense"]),
        "fourierft"),
    Row("fourierft-llama-pattern-seed", "llama",
        dict(n_frequency=48, scaling=30.0, random_loc_seed=5, n_frequency_pattern={"v_proj": 20},
             target_modules=["q_proj", "v_proj", "down_proj"]), "fourierft"),
    Row("fourierft-gpt2-conv1d", "gpt2",
        dict(n_frequency=32, scaling=20.0, target_modules=["c_attn", "c_proj"], **GPT2), "fourierft"),
    Row("miss-bert", "bert", dict(r=8, target_modules=["query", "value", "intermediate.dense", "output.dense"]),
        "miss"),
    Row("miss-llama-remainder", "llama", dict(r=5, target_modules=["k_proj", "down_proj"]), "miss"),
    Row("miss-bert-bat", "bert", dict(r=8, init_weights="bat", target_modules=["key", "output.dense"]), "miss"),
    Row("miss-llama-mini", "llama", dict(r=4, mini_r=8, init_weights="mini", target_modules=["q_proj", "up_proj"]),
        "miss"),
    Row("adalora-bert", "bert", dict(init_r=6, target_r=4, lora_alpha=16, total_step=20,
                                     target_modules=["query", "value", "intermediate.dense"]), "adalora"),
    Row("adalora-gpt2-conv1d", "gpt2", dict(init_r=4, target_r=2, total_step=5, target_modules=["c_attn", "c_proj"],
                                            **GPT2), "adalora"),
    Row("randlora-bert", "bert", dict(r=8, randlora_alpha=16, target_modules=["query", "intermediate.dense"]),
        "randlora"),
    Row("randlora-bert-no-saved-projection", "bert",
        dict(r=8, randlora_alpha=16, save_projection=False, projection_prng_key=4,
             target_modules=["value", "output.dense"]), "randlora"),
    Row("randlora-llama-very-sparse", "llama",
        dict(r=16, randlora_alpha=32, very_sparse=True, save_projection=False, target_modules=["q_proj", "up_proj"]),
        "randlora"),
    Row("randlora-gpt2-conv1d-sparse", "gpt2",
        dict(r=8, randlora_alpha=16, sparse=True, target_modules=["c_attn", "c_fc"], **GPT2), "randlora"),
    Row("oft-bert", "bert", dict(oft_block_size=8, target_modules=["query", "value", "output.dense"]), "oft"),
    Row("oft-llama-r-shared", "llama",
        dict(r=4, oft_block_size=0, block_share=True, target_modules=["k_proj", "down_proj"]), "oft"),
    Row("oft-llama-exact-cayley", "llama",
        dict(oft_block_size=16, use_cayley_neumann=False, target_modules=["q_proj", "up_proj"]), "oft"),
    Row("oft-bert-neumann-3", "bert", dict(oft_block_size=4, num_cayley_neumann_terms=3, target_modules=["key"]),
        "oft"),
    Row("boft-bert", "bert", dict(boft_block_size=4, target_modules=["query", "value", "output.dense"]), "boft"),
    Row("boft-bert-butterfly-2", "bert",
        dict(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["key", "intermediate.dense"]), "boft"),
    Row("boft-llama-block-num-butterfly-3", "llama",
        dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3, target_modules=["q_proj", "down_proj"]),
        "boft"),
    Row("boft-llama-dropout-modules-to-save", "llama",
        dict(boft_block_size=8, boft_dropout=0.1, target_modules=["k_proj", "up_proj"], modules_to_save=["lm_head"]),
        "boft"),
    Row("ln-tuning-bert", "bert", dict(target_modules=["LayerNorm"]), "ln_tuning"),
    Row("ln-tuning-llama-rmsnorm", "llama", dict(target_modules=["post_attention_layernorm", "norm"]), "ln_tuning"),
    # (no modules_to_save: PEFT's LN-tuning merge_and_unload leaves its modules_to_save wrappers in place)
    Row("ln-tuning-gpt2", "gpt2", dict(target_modules=["ln_2", "ln_f"]), "ln_tuning"),
]
rows = pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])


@torch.no_grad()
def randomise(params: list[nn.Parameter], seed: int) -> None:
    """Zeros become N(0, 0.1²); anything else gets 10% relative noise (keeps DoRA's magnitude positive)."""
    g = torch.Generator().manual_seed(seed)
    assert params
    for p in params:
        size = p.abs().mean().item()
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.1 * size if size > 0 else 0.1))


def peft_model(tiny, row: Row, seed: int = 0) -> peft.PeftModel:
    model = peft.get_peft_model(tiny[row.model].build(), row.peft_config())
    trainable = [p for n, p in model.named_parameters() if p.requires_grad]
    assert any("modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad) \
        == bool(row.kwargs.get("modules_to_save"))
    randomise(trainable, seed)
    return model.eval()


def splice_model(tiny, row: Row, seed: int = 0) -> nn.Module:
    model = splice.adapt(tiny[row.model].build(), row.splice_config())
    randomise(splice.trainable_parameters(model, "default"), seed)
    return model.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@rows
def test_peft_folder_loads_in_splice_with_same_outputs(tiny, row, tmp_path):
    fam = tiny[row.model]
    reference = peft_model(tiny, row)
    reference.save_pretrained(tmp_path / "peft")
    ours = splice.load_adapter(fam.build(), tmp_path / "peft")
    expected = fam.output(reference)
    assert (expected - fam.output(fam.build())).abs().max() > 1e-3  # the adapter does something
    close(fam.output(ours), expected)


def test_a_peft_folder_saved_as_bin_loads_and_another_safetensors_beside_it_is_ignored(tiny, tmp_path):
    row = ROWS[0]
    fam = tiny[row.model]
    reference = peft_model(tiny, row)
    reference.save_pretrained(tmp_path / "peft", safe_serialization=False)  # PEFT's default before 0.6
    assert (tmp_path / "peft" / "adapter_model.bin").is_file()
    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "peft" / "head.safetensors")  # e.g. a classifier head
    close(fam.output(splice.load_adapter(fam.build(), tmp_path / "peft")), fam.output(reference))
    (tmp_path / "peft" / "adapter_model.bin").unlink()
    with pytest.raises(SpliceError, match=r"peft: adapter folder has no adapter_model.safetensors \(or "
                                          r"adapter_model.bin\)"):
        splice.load_adapter(fam.build(), tmp_path / "peft")


@rows
def test_splice_folder_loads_in_peft_with_same_outputs(tiny, row, tmp_path):
    fam = tiny[row.model]
    ours = splice_model(tiny, row)
    splice.save_adapter(ours, tmp_path / "splice")
    cfg = json.loads((tmp_path / "splice" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == str(row.peft_config().peft_type.value)
    assert cfg.get("use_dora", False) == bool(row.kwargs.get("use_dora"))
    reference = peft.PeftModel.from_pretrained(fam.build(), tmp_path / "splice").eval()
    expected = fam.output(reference)
    assert (expected - fam.output(fam.build())).abs().max() > 1e-3
    close(fam.output(ours), expected)


@rows
def test_merge_and_unload_gives_peft_weights(tiny, row, tmp_path):
    fam = tiny[row.model]
    reference = peft_model(tiny, row)
    reference.save_pretrained(tmp_path / "peft")
    theirs = reference.merge_and_unload().state_dict()
    ours = splice.merge_and_unload(splice.load_adapter(fam.build(), tmp_path / "peft")).state_dict()
    base = fam.build().state_dict()
    assert ours.keys() == theirs.keys() == base.keys()
    changed = [k for k in base if (theirs[k] - base[k]).abs().max() > 1e-4]
    assert changed, "the merge changed nothing"
    for k in base:
        torch.testing.assert_close(ours[k], theirs[k], atol=ATOL, rtol=0, msg=f"merged {k}")


@pytest.mark.parametrize("method", sorted(set(PEFT_CONFIGS) - {"ln_tuning"}))  # LN tuning: its own regex
def test_unset_targets_use_peft_s_table_for_the_method(method):
    """Every architecture in PEFT's per-method table gets the same modules (regex entries aside)."""
    from peft.utils import constants

    theirs = getattr(constants, f"TRANSFORMERS_MODELS_TO_{'LORA' if method == 'dora' else method.upper()}"
                                f"_TARGET_MODULES_MAPPING")
    config = make_config(method)
    for model_type, names in theirs.items():
        if isinstance(names, list):
            assert config.architecture_defaults(model_type, {"target_modules"}) == {"target_modules": names}, \
                model_type
    if method == "ia3":
        feedforward = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
        for model_type, names in feedforward.items():
            got = config.architecture_defaults(model_type, {"target_modules", "feedforward_modules"})
            assert got["feedforward_modules"] == names, model_type


@pytest.mark.parametrize("model, fields", [
    ("bert", {}), ("llama", {}), ("gpt2", GPT2), ("bert", dict(target_modules=["value", "output.dense"])),
    ("llama", dict(target_modules=["q_proj", "down_proj"])), ("bert", dict(target_modules=".*value"))],
    ids=["bert", "llama", "gpt2", "bert-targets", "llama-targets", "bert-regex"])
def test_ia3_unset_fields_resolve_as_peft_resolves_them(tiny, model, fields):
    """IA3Config() wraps the modules PEFT's IA3Config() wraps, each with the same vector (its shape says whether
    the input or the output is rescaled)."""
    from splice.adapters.inject import adapter_layers

    theirs = {n.removeprefix("base_model.model.").removesuffix(".ia3_l.default"): tuple(p.shape)
              for n, p in peft.get_peft_model(tiny[model].build(), peft.IA3Config(**fields)).named_parameters()
              if "ia3_l" in n}
    fields = {k: v for k, v in fields.items() if k != "fan_in_fan_out"}
    ours = {n: tuple(layer.adapters["default"].ia3_l.shape)
            for n, layer in adapter_layers(splice.adapt(tiny[model].build(), splice.IA3Config(**fields)))}
    assert ours == theirs and theirs


def test_ia3_feedforward_default_keeps_a_saved_folder_loadable_where_peft_s_own_is_not(tiny, tmp_path):
    """PEFT fills an unset feedforward_modules with the whole per-architecture list, so its folder for targets
    query,value lists output.dense as feed-forward and its own subset check then refuses to load it."""
    fam = tiny["bert"]
    reference = peft.get_peft_model(fam.build(), peft.IA3Config(target_modules=["query", "value"]))
    reference.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="subset"):
        peft.PeftModel.from_pretrained(fam.build(), tmp_path / "peft")
    config = splice.IA3Config(target_modules=["query", "value"])
    ours = splice_model_from(fam, config)
    assert config.feedforward_modules == []
    splice.save_adapter(ours, tmp_path / "splice")
    close(fam.output(peft.PeftModel.from_pretrained(fam.build(), tmp_path / "splice").eval()), fam.output(ours))


def splice_model_from(fam, config) -> nn.Module:
    model = splice.adapt(fam.build(), config)
    randomise(splice.trainable_parameters(model, "default"), 0)
    return model.eval()


def test_pissa_matches_peft_init_and_outputs(tiny, tmp_path):
    """PEFT's PiSSA moves −sB₀A₀ into the base weight; splice keeps the base and subtracts it in the layer. Same
    SVD start, and after the same update the same outputs; splice's folder (rank 2r, plain LoRA) loads in PEFT."""
    fam = tiny["llama"]
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(fam.build(), peft.LoraConfig(init_lora_weights="pissa", **fields)).eval()
    ours = splice.adapt(fam.build(), splice.LoraConfig(init_lora_weights="pissa", **fields)).eval()
    base_out = fam.output(fam.build())
    close(fam.output(ours), base_out)
    close(fam.output(theirs), base_out)

    their_params = {n.replace("base_model.model.", "").replace(".default", ""): p
                    for n, p in theirs.named_parameters() if "lora_" in n}
    ours_params = {n.replace(".adapters.default", "") + ".weight": p
                   for n, p in ours.named_parameters() if "lora_" in n}
    assert their_params.keys() == ours_params.keys() and len(ours_params) == 8
    for n, p in ours_params.items():
        close(p, their_params[n])
    randomise(list(ours_params.values()), seed=3)  # the same "training step" on both
    with torch.no_grad():
        for n, p in ours_params.items():
            their_params[n].copy_(p)
    expected = fam.output(theirs)
    assert (expected - base_out).abs().max() > 1e-3
    close(fam.output(ours), expected)

    splice.save_adapter(ours, tmp_path / "pissa")
    reloaded = peft.PeftModel.from_pretrained(fam.build(), tmp_path / "pissa").eval()
    close(fam.output(reloaded), expected)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_unconverted_peft_pissa_or_olora_folder_loads_with_the_same_outputs(tiny, tmp_path, init):
    # PEFT saves these at rank r with init_lora_weights kept, to run on W − s·B₀A₀; splice read them as a kaiming
    # LoRA on W and lost s·B₀A₀ (an output error of the output's own size).
    fam = tiny["bert"]
    model = peft.get_peft_model(fam.build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                             init_lora_weights=init))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    model.save_pretrained(tmp_path / init)
    assert json.loads((tmp_path / init / "adapter_config.json").read_text())["init_lora_weights"] == init
    close(fam.output(splice.load_adapter(fam.build(), tmp_path / init)), fam.output(model))
    cfg = json.loads((tmp_path / init / "adapter_config.json").read_text())
    (tmp_path / init / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(SpliceError, match="saved without PEFT's conversion"):  # a randomised SVD: not rebuildable
        splice.load_adapter(fam.build(), tmp_path / init)


def test_boft_on_a_cpu_only_peft_uses_one_butterfly_factor_and_splice_reads_what_it_used(tiny, tmp_path,
                                                                                        monkeypatch):
    """The README's claim: where PEFT's CUDA extension cannot be built it quietly uses one butterfly factor, and
    a folder it saves still says two; splice reads the factor count from the tensors and gives PEFT's outputs. A
    splice folder with two factors does not load into such a PEFT (shapes differ): an error, not wrong outputs."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)  # a CPU-only machine: no extension
    row = next(r for r in ROWS if r.id == "boft-bert-butterfly-2")
    fam = tiny[row.model]
    reference = peft_model(tiny, row)
    reference.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 2
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in saved.items() if "boft_R" in k} == {1}  # (factors, blocks, b, b)
    ours = splice.load_adapter(fam.build(), tmp_path / "peft")
    close(fam.output(ours), fam.output(reference))
    splice.save_adapter(splice_model(tiny, row), tmp_path / "splice")  # two factors, in plain torch
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(fam.build(), tmp_path / "splice")
