"""Bottleneck adapters (Houlsby, Pfeiffer, Compacter) and SSF: each method's defining property on a constructed case.

(Save/load, disable, two adapters, mixed batch, delete and backward are rows in test_contract.py; so are the
refusals of merge / get_delta for the bottleneck methods. This is what only these methods have.)
Tolerance: 1e-5 absolute where the same weights run another code path (fp32); exact where the computation is the
same (the base at init).
"""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import each_row_alone
from torch import nn

import splice
from splice.adapters import make_config
from splice.adapters.compacter import PHMProjection, phm_weight
from splice.adapters.inject import adapter_layers
from splice.delta.forms import Dense, Scale

BOTTLENECKS = ["houlsby", "pfeiffer", "compacter"]
NOT_A_DELTA = "{} adapters are not a weight delta: they cannot be {}; serve or train them as they are"


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def wrapped(model: nn.Module, name: str = "default") -> dict[str, nn.Module]:
    """Module path → the adapter `name` on it."""
    return {path: layer.adapters[name] for path, layer in adapter_layers(model) if name in layer.adapters}


def randomise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in splice.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# -- placement and the base at init --------------------------------------------------------------------------------
@pytest.mark.parametrize("method, model_name, expected", [
    ("houlsby", "bert", {"attention.output.dense", "output.dense"}),
    ("houlsby", "llama", {"self_attn.o_proj", "mlp.down_proj"}),
    ("houlsby", "gpt2", {"attn.c_proj", "mlp.c_proj"}),
    ("compacter", "bert", {"attention.output.dense", "output.dense"}),
    ("pfeiffer", "bert", {"output.dense"}),
    ("pfeiffer", "llama", {"mlp.down_proj"}),
    ("pfeiffer", "gpt2", {"mlp.c_proj"}),
])
def test_default_targets_are_the_attention_and_ffn_output_projections(tiny, method, model_name, expected):
    fields = {"reduction_factor": 4} if method == "compacter" else {}
    model = splice.adapt(tiny[model_name].build(), make_config(method, **fields))
    paths = list(wrapped(model))
    assert len(paths) == 2 * len(expected)  # two blocks
    # the name inside the block: "encoder.layer.0.attention.output.dense" → "attention.output.dense"
    assert {re.sub(r"^.*?\.\d+\.", "", p) for p in paths} == expected


@pytest.mark.parametrize("method", [*BOTTLENECKS, "ssf"])
@pytest.mark.parametrize("model_name", ["bert", "llama", "gpt2"])
def test_adapted_model_equals_the_base_at_init(tiny, method, model_name):
    fam = tiny[model_name]
    base_out = fam.output(fam.build())
    fields = {"reduction_factor": 4} if method == "compacter" else {}
    model = splice.adapt(fam.build(), make_config(method, **fields))
    assert torch.equal(fam.output(model), base_out)
    randomise(model)
    assert (fam.output(model) - base_out).abs().max() > 1e-3  # and the adapter is not inert


# -- the bottleneck's math -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation, f", [("relu", F.relu), ("gelu", F.gelu), ("swish", F.silu),
                                           ("tanh", torch.tanh),
                                           ("gelu_new", lambda t: F.gelu(t, approximate="tanh"))])
def test_houlsby_output_is_base_plus_bottleneck_of_the_base_output(activation, f):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8))
    splice.adapt(model, splice.HoulsbyConfig(target_modules=["0"], bottleneck_size=3, non_linearity=activation))
    randomise(model)
    a = wrapped(model)["0"]
    x = torch.randn(5, 12)
    with torch.no_grad():
        h = model[0].base(x)
        want = h + F.linear(f(F.linear(h, a.adapter_down.weight, a.adapter_down.bias)), a.adapter_up.weight,
                            a.adapter_up.bias)
        close(model(x), want)


def test_phm_weight_is_the_sum_of_kronecker_products():
    g = torch.Generator().manual_seed(0)
    n, r, in_f, out_f = 2, 2, 6, 4
    proj = PHMProjection(n, in_f, out_f, r, torch.device("cpu"), torch.float32)
    A = torch.randn(n, n, n, generator=g)
    with torch.no_grad():
        proj.s.copy_(torch.randn(proj.s.shape, generator=g))
        proj.t.copy_(torch.randn(proj.t.shape, generator=g))
    want = sum(torch.kron(A[i], proj.s[i] @ proj.t[i]) for i in range(n))  # B_i = s_i t_iᵀ: (out/n, in/n)
    assert want.shape == (out_f, in_f)
    close(proj.weight(A), want, atol=1e-6)
    # A hand-checkable case: A_0 = I, A_1 = 0 → block-diagonal copies of B_0
    B = torch.arange(6.0).reshape(1, 2, 3).repeat(2, 1, 1)
    eye = torch.stack([torch.eye(2), torch.zeros(2, 2)])
    assert torch.equal(phm_weight(eye, B), torch.block_diag(B[0], B[0]))


def test_compacter_slow_weights_are_one_tensor_shared_by_every_layer(tiny):
    model = splice.adapt(tiny["bert"].build(), splice.CompacterConfig(reduction_factor=4), "a")
    splice.adapt(model, splice.CompacterConfig(reduction_factor=4), "b")
    rules_a = {id(m.rule.A) for m in wrapped(model, "a").values()}
    rules_b = {id(m.rule.A) for m in wrapped(model, "b").values()}
    assert len(wrapped(model, "a")) == 4 and len(rules_a) == 1 and len(rules_b) == 1 and rules_a != rules_b
    A = next(iter(wrapped(model, "a").values())).rule.A
    assert A.shape == (4, 4, 4)
    # listed (and so stepped by an optimizer) once
    params = splice.trainable_parameters(model, "a")
    assert sum(p is A for p in params) == 1
    # every layer's projections are built from that one tensor: Σ A_i ⊗ (s_i t_i), on the layer's output
    splice.set_adapter(model, "a")
    randomise(model)
    fam = tiny["bert"]
    for path, adapter in wrapped(model, "a").items():
        layer = model.get_submodule(path)
        h = torch.randn(2, 3, 32)
        with torch.no_grad():
            Wd = sum(torch.kron(A[i], adapter.phm_down.s[i] @ adapter.phm_down.t[i]) for i in range(4))
            Wu = sum(torch.kron(A[i], adapter.phm_up.s[i] @ adapter.phm_up.t[i]) for i in range(4))
            want = F.linear(F.gelu(F.linear(h, Wd, adapter.phm_down.bias), approximate="tanh"), Wu,
                            adapter.phm_up.bias)
            close(adapter.contribution(h, h, layer.base), want)
    # one backward: A's gradient gathers every layer's
    model.train()
    fam.run(model, fam.batch()).sum().backward()
    assert A.grad is not None and A.grad.abs().max() > 0


def test_compacter_folder_saves_the_shared_weights_once_and_loads_them_shared(tiny, tmp_path):
    fam = tiny["bert"]
    model = splice.adapt(fam.build(), splice.CompacterConfig(bottleneck_size=8, phm_rank=2))
    randomise(model)
    path = splice.save_adapter(model, tmp_path / "c")
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert [k for k in keys if "phm_rule" in k] == ["base_model.phm_rule"]
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] is None and cfg["splice_method"] == "compacter"
    assert (cfg["bottleneck_size"], cfg["phm_rank"], cfg["phm_dim"]) == (8, 2, 4)
    loaded = splice.load_adapter(fam.build(), path)
    assert len({id(m.rule.A) for m in wrapped(loaded).values()}) == 1
    close(fam.output(loaded), fam.output(model))


# -- parameter counts against params_formula ------------------------------------------------------------------------
def widths(model: nn.Module) -> list[int]:
    """The output width d of every wrapped module."""
    out = []
    for _, layer in adapter_layers(model):
        w = layer.base.weight
        out.append(w.shape[1] if layer.kind == "conv1d" else w.shape[0])
    return out


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in splice.trainable_parameters(model))


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("model_name, fields", [("bert", {}), ("llama", {"bottleneck_size": 5}),
                                                ("gpt2", {"reduction_factor": 8})])
def test_bottleneck_count_is_2dm_plus_d_plus_m_per_module(tiny, method, model_name, fields):
    config = make_config(method, **fields)
    model = splice.adapt(tiny[model_name].build(), config)
    ds = widths(model)
    m = lambda d: config.bottleneck_size or int(d // config.reduction_factor)  # noqa: E731
    assert count(model) == sum(2 * d * m(d) + d + m(d) for d in ds)
    assert config.params_formula.startswith("2·out·m + out + m")


@pytest.mark.parametrize("model_name, fields", [("bert", {"reduction_factor": 4}),
                                                ("gpt2", {"bottleneck_size": 4, "phm_dim": 2, "phm_rank": 2}),
                                                ("llama", {"reduction_factor": 2, "phm_dim": 8})])
def test_compacter_count_is_2r_d_plus_m_plus_d_plus_m_per_module_and_n_cubed_once(tiny, model_name, fields):
    config = splice.CompacterConfig(**fields)
    model = splice.adapt(tiny[model_name].build(), config)
    ds = widths(model)
    n, r = config.phm_dim, config.phm_rank
    m = lambda d: config.bottleneck_size or int(d // config.reduction_factor)  # noqa: E731
    assert count(model) == sum(2 * r * (d + m(d)) + d + m(d) for d in ds) + n ** 3


def test_ssf_count_is_2_out_per_module_or_out_without_a_shift(tiny):
    bert = splice.adapt(tiny["bert"].build(), splice.SSFConfig())
    assert count(bert) == sum(2 * d for d in widths(bert))
    llama = splice.adapt(tiny["llama"].build(), splice.SSFConfig(shift="where_bias"))  # Llama has no biases
    assert count(llama) == sum(widths(llama))
    llama_all = splice.adapt(tiny["llama"].build(), splice.SSFConfig())
    assert count(llama_all) == 2 * sum(widths(llama_all))


# -- merge / get_delta / apply / compress refuse bottleneck adapters ----------------------------------------------
@pytest.mark.parametrize("method", BOTTLENECKS)
def test_bottleneck_adapters_refuse_merge_and_get_delta_with_one_line(tiny, method, tmp_path):
    fam = tiny["bert"]
    model = splice.adapt(fam.build(), make_config(method, reduction_factor=4))
    randomise(model)
    out = fam.output(model)
    for call, action in [(splice.merge_adapter, "merged"), (splice.merge_and_unload, "merged"),
                         (splice.get_delta, "returned as a delta")]:
        with pytest.raises(splice.SpliceError) as info:
            call(model, "default")
        assert one_line(info) == NOT_A_DELTA.format(method, action)
    assert torch.equal(fam.output(model), out)  # untouched, still adapted
    assert all(not layer.merged for _, layer in adapter_layers(model))
    # the layer's own guard, should a caller go around the model-level check
    layer = next(layer for _, layer in adapter_layers(model))
    with pytest.raises(splice.SpliceError, match="is not a weight delta: it cannot be merged"):
        layer.merge("default")

    # folders: apply, compress (with or without a base) and merge read them through the same refusal
    from splice.apply import apply_adapter
    from splice.compress import open_deltas

    base_dir = tmp_path / "base"
    fam.build().save_pretrained(base_dir)
    folder = splice.save_adapter(model, tmp_path / "adapter")
    want = f"{folder}: " + NOT_A_DELTA.format(method, "merged or compressed")
    for call in (lambda: apply_adapter(str(base_dir), folder, tmp_path / "out", progress=False),
                 lambda: open_deltas(folder), lambda: open_deltas(folder, str(base_dir))):
        with pytest.raises(splice.SpliceError) as info:
            call()
        assert one_line(info) == want
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", BOTTLENECKS)
def test_bottleneck_mixed_batch_trains(tiny, method):
    """Under autograd, too: each group's bottleneck reads that group's base rows, and the backward runs."""
    fam = tiny["llama"]
    model = fam.build()
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        splice.adapt(model, make_config(method, reduction_factor=4), name)
    splice.set_adapter(model, ["a", "b"])  # both trainable
    randomise(model)
    model.train()
    batch = fam.batch(rows=4)
    names = ["b", None, "a", "b"]
    with splice.mixed_batch(model, names):
        mixed = fam.run(model, batch)
    mixed.square().sum().backward()
    params = splice.trainable_parameters(model)
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params)
    model.eval()
    for i, alone in enumerate(each_row_alone(fam, model, batch, names)):
        close(mixed[i:i + 1].detach(), alone)


def test_bottleneck_adapters_serve_in_one_batch_with_the_library_alone_tokens(tiny, tmp_path):
    """"Serve them as they are": the engine's mixed batches (with a KV cache) give each adapter's own tokens."""
    from splice.serve import AdapterPool, Engine, SamplingParams

    build = tiny["llama"].build
    configs = {"h": splice.HoulsbyConfig(bottleneck_size=8), "p": splice.PfeifferConfig(),
               "c": splice.CompacterConfig(reduction_factor=4), "s": splice.SSFConfig()}
    for i, (name, config) in enumerate(configs.items()):
        m = splice.adapt(build(), config)
        with torch.no_grad():
            for p in splice.trainable_parameters(m):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
        splice.save_adapter(m, tmp_path / name)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [14]]
    jobs = [(a, p) for a in (None, *configs) for p in prompts]
    want = []
    for a, p in jobs:
        ref = build() if a is None else splice.load_adapter(build(), tmp_path / a)
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
        want.append(out[0, len(p):].tolist())
    assert len({tuple(w) for w in want}) > len(prompts)  # the adapters change the tokens
    model = build()
    with Engine(model, AdapterPool(model, tmp_path), max_batch=6) as engine:
        got = engine.generate([p for _, p in jobs], [a for a, _ in jobs], SamplingParams(max_tokens=5))
    assert got == want


def test_bottleneck_config_fields_round_trip_through_the_folder(tiny, tmp_path):
    config = splice.HoulsbyConfig(bottleneck_size=4, non_linearity="tanh", dropout=0.1, init_weights="near_identity")
    model = splice.adapt(tiny["gpt2"].build(), config)
    path = splice.save_adapter(model, tmp_path / "h")
    loaded = splice.load_adapter(tiny["gpt2"].build(), path)
    assert splice.adapters.model.configs(loaded)["default"] == config
    close(tiny["gpt2"].output(loaded), tiny["gpt2"].output(model))


# -- SSF ------------------------------------------------------------------------------------------------------------
def ssf_model(kind: str, shift: str = "all") -> tuple[nn.Module, torch.Tensor]:
    """A two-layer model with biases (Linear, or HF Conv1D), SSF on both, randomised; and an input."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    make = (lambda i, o: nn.Linear(i, o)) if kind == "linear" else (lambda i, o: Conv1D(o, i))
    model = nn.Sequential(make(6, 5), nn.Tanh(), make(5, 4))
    splice.adapt(model, splice.SSFConfig(target_modules=["0", "2"], shift=shift))
    randomise(model)
    return model, torch.randn(3, 6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_ssf_output_is_scale_and_shift_of_the_base_output(kind):
    model, x = ssf_model(kind)
    a = wrapped(model)["0"]
    with torch.no_grad():
        close(model[0](x), a.ssf_scale * model[0].base(x) + a.ssf_shift)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_ssf_delta_is_a_scale_of_the_weight_and_a_dense_bias(kind):
    model, x = ssf_model(kind)
    delta = splice.get_delta(model)
    a, base = wrapped(model)["0"], model[0].base
    weight, bias = delta["0.weight"], delta["0.bias"]
    assert isinstance(weight, Scale) and isinstance(bias, Dense)
    assert torch.equal(weight.vector, a.ssf_scale.detach()) and weight.axis == (1 if kind == "conv1d" else 0)
    close(bias.tensor, (a.ssf_scale - 1).detach() * base.bias + a.ssf_shift.detach())
    # W' = γ ∘ rows of W (columns of Conv1D's (in, out) weight), b' = γ ∘ b + β
    scaled = base.weight * (a.ssf_scale[None, :] if kind == "conv1d" else a.ssf_scale[:, None])
    close(weight.materialize(base.weight) + base.weight, scaled.detach())


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_ssf_merge_gives_the_unmerged_outputs_and_unmerge_restores_the_weights(kind):
    model, x = ssf_model(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    with torch.no_grad():
        out = model(x)
        splice.merge_adapter(model, "default")
        close(model(x), out)
        plain = nn.Sequential(*[layer.base if hasattr(layer, "adapters") else layer for layer in model])
        close(plain(x), out)  # the merged base alone gives the adapted outputs
        splice.unmerge_adapter(model, "default")
    for n, p in model.named_parameters():
        if n in before:
            close(p, before[n])


def test_ssf_shift_without_a_bias_refuses_merge_with_one_line_and_touches_nothing(tiny):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False))  # the first one could merge
    splice.adapt(model, splice.SSFConfig(target_modules=["0", "2"]))
    randomise(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(3, 6)
    with torch.no_grad():
        out = model(x)
    for call, action in [(splice.merge_adapter, "merged"), (splice.get_delta, "returned as a delta")]:
        with pytest.raises(splice.SpliceError) as info:
            call(model, "default")
        assert one_line(info) == (
            f"adapter 'default' cannot be {action}: module '2' (Linear) has no bias, so its ssf shift β is not a "
            "weight delta; train with shift='where_bias' (β only where a bias exists) for an adapter that merges")
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(not layer.merged for _, layer in adapter_layers(model))
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_ssf_shift_without_a_bias_is_refused_by_apply_and_where_bias_merges(tiny, tmp_path):
    from splice.apply import apply_adapter

    fam = tiny["llama"]
    base_dir = tmp_path / "base"
    fam.build().save_pretrained(base_dir)
    model = splice.adapt(fam.build(), splice.SSFConfig())
    randomise(model)
    folder = splice.save_adapter(model, tmp_path / "all")
    with pytest.raises(splice.SpliceError) as info:
        apply_adapter(str(base_dir), folder, tmp_path / "out", progress=False)
    assert "has no bias, so its ssf shift β is not a weight delta" in one_line(info)
    assert not (tmp_path / "out").exists()

    model = splice.adapt(fam.build(), splice.SSFConfig(shift="where_bias"))
    randomise(model)
    folder = splice.save_adapter(model, tmp_path / "where_bias")
    apply_adapter(str(base_dir), folder, tmp_path / "merged", progress=False)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    close(fam.output(merged), fam.output(model))


def test_ssf_on_gpt2_conv1d_and_its_layer_norms_applies_to_the_same_model(tiny, tmp_path):
    from transformers import GPT2LMHeadModel

    from splice.apply import apply_adapter

    fam = tiny["gpt2"]
    base_dir = tmp_path / "base"
    fam.build().save_pretrained(base_dir)
    model = splice.adapt(fam.build(), splice.SSFConfig(target_modules=["c_attn", "c_proj", "c_fc", "ln_1", "ln_f"]))
    randomise(model)
    folder = splice.save_adapter(model, tmp_path / "ssf")
    apply_adapter(str(base_dir), folder, tmp_path / "merged", progress=False)
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    close(fam.output(merged), fam.output(model))


def test_ssf_wraps_layer_norms_and_conv2d(tiny):
    fam = tiny["bert"]
    model = splice.adapt(fam.build(), splice.SSFConfig(target_modules=["LayerNorm"]))
    assert {type(layer.base).__name__ for _, layer in adapter_layers(model)} == {"LayerNorm"}
    randomise(model)
    out = fam.output(model)
    splice.merge_adapter(model, "default")
    close(fam.output(model), out, atol=1e-4 * max(1.0, out.abs().max().item()))
    cnn = splice.adapt(tiny["cnn"].build(), splice.SSFConfig(target_modules=["conv1"]))
    assert wrapped(cnn)["conv1"].ssf_scale.shape == (8,)


def test_ssf_paper_init_draws_scale_around_one_and_shift_around_zero(tiny):
    torch.manual_seed(0)
    model = splice.adapt(tiny["bert"].build(), splice.SSFConfig(init_weights="paper"))
    scale = torch.cat([a.ssf_scale.detach() for a in wrapped(model).values()])
    shift = torch.cat([a.ssf_shift.detach() for a in wrapped(model).values()])
    assert abs(scale.mean() - 1) < 0.01 and 0.015 < scale.std() < 0.025
    assert abs(shift.mean()) < 0.01 and 0.015 < shift.std() < 0.025


# -- invalid configs: one line, at config time or at adapt time (widths are known then) ----------------------------
@pytest.mark.parametrize("method, fields, match", [
    ("houlsby", {"non_linearity": "rellu"}, "non_linearity: unknown 'rellu' (did you mean 'relu'"),
    ("houlsby", {"reduction_factor": 0}, "reduction_factor: must be a positive number, got 0"),
    ("houlsby", {"reduction_factor": "big"}, "reduction_factor: must be a positive number, got 'big'"),
    ("houlsby", {"bottleneck_size": 0}, "bottleneck_size: must be a positive integer or null, got 0"),
    ("houlsby", {"dropout": 1.0}, "dropout: must be in [0, 1), got 1.0"),
    ("houlsby", {"init_weights": "zeros"}, "init_weights: unknown 'zeros'"),
    ("pfeiffer", {"non_linearity": "softmax"}, "non_linearity: unknown 'softmax'"),
    ("compacter", {"phm_dim": 0}, "phm_dim: must be a positive integer, got 0"),
    ("compacter", {"phm_rank": 1.5}, "phm_rank: must be a positive integer, got 1.5"),
    ("compacter", {"phm_init_range": -1.0}, "phm_init_range: must be a positive number or null, got -1.0"),
    ("ssf", {"shift": "some"}, "shift: unknown 'some'"),
    ("ssf", {"init_weights": "papers"}, "init_weights: unknown 'papers' (did you mean 'paper'"),
])
def test_invalid_configs_fail_at_config_time_with_one_line(method, fields, match):
    with pytest.raises(splice.SpliceError) as info:
        make_config(method, **fields)
    assert one_line(info).startswith(match)


@pytest.mark.parametrize("method, fields, match", [
    ("houlsby", {"reduction_factor": 64}, "reduction_factor: 64 is larger than the width 32 of module "
                                          "'encoder.layer.0.attention.output.dense' (bottleneck 32 // 64 = 0)"),
    ("compacter", {"phm_dim": 3, "reduction_factor": 4}, "phm_dim: 3 must divide both the width 32 and the "
                                                         "bottleneck size 8 of module "
                                                         "'encoder.layer.0.attention.output.dense'"),
    ("compacter", {"phm_rank": 3, "reduction_factor": 4}, "phm_rank: 3 is larger than the 2 a factor"),
    ("houlsby", {"target_modules": ["word_embeddings"]}, "houlsby cannot wrap Embedding"),
    ("ssf", {"target_modules": ["word_embeddings"]}, "ssf cannot wrap Embedding"),
    ("ssf", {"target_modules": ["attention"]}, "ssf cannot wrap BertAttention"),
])
def test_invalid_configs_fail_at_adapt_time_with_one_line_and_leave_the_model(tiny, method, fields, match):
    model = tiny["bert"].build()
    types = {n: type(m) for n, m in model.named_modules()}
    config = make_config(method, **fields)
    with pytest.raises(splice.SpliceError) as info:
        splice.adapt(model, config)
    assert one_line(info).startswith(match) or match in one_line(info)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(p.requires_grad for p in model.parameters())


def test_compacter_default_reduction_leaves_a_bottleneck_phm_dim_cannot_divide(tiny):
    # 32 // 32 = 1: a bottleneck of 1, which n = 4 does not divide
    with pytest.raises(splice.SpliceError) as info:
        splice.adapt(tiny["bert"].build(), splice.CompacterConfig())
    assert one_line(info).startswith("phm_dim: 4 must divide both the width 32 and the bottleneck size 1")


def test_ssf_refuses_batch_norm(tiny):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(splice.SpliceError) as info:
        splice.adapt(model, splice.SSFConfig(target_modules=["1"]))
    assert one_line(info).startswith("ssf cannot wrap BatchNorm2d")
