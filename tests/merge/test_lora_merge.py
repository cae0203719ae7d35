"""LoRA adapters as merge inputs (read as base + s·B·A, lazily) and as merge output (one adapter, exact by rank
concatenation or truncated by SVD), checked against densified models, against PEFT, and against mergekit."""
from __future__ import annotations

import json

import pytest
import torch

from splice.apply import apply_adapter
from splice.errors import SpliceError
from splice.merge import merge


def densify(base, adapter, out):
    """The adapter merged into its base by PEFT, saved as a plain float32 model folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload() \
        .save_pretrained(out)
    return out


def models(paths, weights=((0.3, 0.9), 0.5, 0.8)):
    return [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights)]


@pytest.fixture
def adapters(family, lora, tmp_path):
    """A tiny Llama base, two PEFT LoRA adapters of it (ranks 4 and 2), and the same two as dense models."""
    fam = family("llama", n=0, layers=2)
    a = lora(fam.base, tmp_path / "lora-a", 0, r=4, alpha=8)
    b = lora(fam.base, tmp_path / "lora-b", 1, r=2, alpha=4, targets=["q_proj", "o_proj", "up_proj"])
    dense = [densify(fam.base, x, tmp_path / f"dense-{x.name}") for x in (a, b)]
    return fam.base, [a, b], dense


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "linear", "slerp"])
def test_merging_adapters_equals_merging_their_densified_models(adapters, weights, tmp_path, method):
    base, loras, dense = adapters
    config = {"merge_method": method, "base_model": str(base)}
    if method == "slerp":
        config.update(models=[{"model": str(base)}, {"model": str(loras[0])}], parameters={"t": [0.2, 0.7]})
        reference = {**config, "models": [{"model": str(base)}, {"model": str(dense[0])}]}
    else:
        config["models"] = models(loras)
        if method == "ties":
            config["parameters"] = {"density": 0.5}
        if method == "linear":
            config["parameters"] = {"weight": 1.0}  # linear merges the base as one more model, as mergekit does
        reference = {**config, "models": models(dense)}
    base_bytes = (base / "model.safetensors").read_bytes()
    ours = weights(merge(config, tmp_path / "from-adapters", progress=False))
    assert (base / "model.safetensors").read_bytes() == base_bytes  # the inputs are only read
    want = weights(merge(reference, tmp_path / "from-dense", progress=False))
    assert set(ours) == set(want)
    for name in ours:
        torch.testing.assert_close(ours[name], want[name], atol=1e-6, rtol=0)


def test_model_plus_adapter_syntax_matches_mergekit(adapters, weights, tmp_path):
    """``base+adapter`` names the adapter applied to that model; mergekit merges it with PEFT first."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base, loras, _ = adapters
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "models": models([f"{base}+{x}" for x in loras])}
    ours = weights(merge(config, tmp_path / "splice", progress=False))
    options = MergeOptions(quiet=True, copy_tokenizer=False, lora_merge_cache=str(tmp_path / "cache"))
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"), options=options)
    theirs = weights(tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- LoRA output
@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_exact_lora_output_applied_to_the_base_equals_the_model_merge(adapters, weights, tmp_path, method):
    base, loras, _ = adapters
    config = {"merge_method": method, "base_model": str(base),
              "models": models(loras, ([0.3, 0.9], [{"filter": "self_attn", "value": 0.8}, {"value": 0.4}]))}
    if method == "linear":
        config["parameters"] = {"weight": 0.5}
    model_out = merge(config, tmp_path / "model", progress=False)
    lora_out = merge(config, tmp_path / "lora", progress=False, out_format="lora")
    peft_cfg = json.loads((lora_out / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 4 and peft_cfg["lora_alpha"] == 4  # scale α/r = 1: the factors carry the weights
    # q_proj is in both adapters: rank 4 + 2, concatenated; v_proj only in the first (4), o_proj only in the second
    assert peft_cfg["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 6
    assert peft_cfg["rank_pattern"]["model.layers.0.self_attn.o_proj"] == 2
    assert "model.layers.0.self_attn.v_proj" not in peft_cfg["rank_pattern"]
    assert "task_arithmetic" in (lora_out / "README.md").read_text() or method == "linear"

    applied = weights(apply_adapter(str(base), lora_out, tmp_path / "applied", progress=False))
    want = weights(model_out)
    for name in want:
        torch.testing.assert_close(applied[name], want[name], atol=1e-6, rtol=0)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora_out).merge_and_unload()
    for name, p in peft_merged.state_dict().items():
        torch.testing.assert_close(p, want[name], atol=1e-6, rtol=0)


def test_exact_lora_output_on_gpt2_conv1d(family, lora, weights, tmp_path):
    fam = family("gpt2", n=0, layers=2)
    loras = [lora(fam.base, tmp_path / f"lora-{i}", i, r=3, alpha=6, fan_in_fan_out=True) for i in range(2)]
    config = {"merge_method": "task_arithmetic", "base_model": str(fam.base), "models": models(loras, (0.6, 0.4))}
    lora_out = merge(config, tmp_path / "lora", progress=False, out_format="lora")
    assert json.loads((lora_out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    applied = weights(apply_adapter(str(fam.base), lora_out, tmp_path / "applied", progress=False))
    want = weights(merge(config, tmp_path / "model", progress=False))
    for name in want:
        torch.testing.assert_close(applied[name], want[name], atol=1e-6, rtol=0)


def test_lora_rank_truncates_by_svd(adapters, weights, tmp_path):
    base, loras, _ = adapters
    config = {"merge_method": "ties", "base_model": str(base), "models": models(loras),
              "parameters": {"density": 0.5}}
    with pytest.raises(SpliceError, match="not a weighted sum.*--lora-rank"):
        merge(config, tmp_path / "exact", progress=False, out_format="lora")
    dense = weights(merge(config, tmp_path / "model", progress=False))
    base_w = weights(base)
    name = "model.layers.1.self_attn.q_proj.weight"
    target = dense[name] - base_w[name]
    errors = []
    for rank in (1, 4, 32):
        out = merge(config, tmp_path / f"r{rank}", progress=False, lora_rank=rank)
        applied = weights(apply_adapter(str(base), out, tmp_path / f"applied-{rank}", progress=False))
        err = (applied[name] - base_w[name] - target).norm().item()
        best = torch.linalg.svdvals(target.double())[rank:].pow(2).sum().sqrt().item()  # Eckart–Young
        assert err == pytest.approx(best, abs=1e-5)
        errors.append(err)
    assert errors[0] > errors[1] > 0 and errors[2] < 1e-5  # rank 32 = full rank: exact


def test_full_rank_lora_output_of_dare_equals_its_model_merge(adapters, weights, tmp_path):
    # DARE keeping every entry of a short probe passed for a weighted sum, and such modules were then written
    # without any drop (17 of 40 tensors at density 0.9, where the model merge drops entries).
    base, loras, _ = adapters
    config = {"merge_method": "dare_linear", "base_model": str(base), "models": models(loras),
              "parameters": {"density": 0.9}}
    model = weights(merge(config, tmp_path / "model", progress=False))
    out = merge(config, tmp_path / "lora", progress=False, lora_rank=64)  # ≥ every module's rank: SVD is exact
    applied = weights(apply_adapter(str(base), out, tmp_path / "applied", progress=False))
    for name, tensor in applied.items():
        torch.testing.assert_close(tensor, model[name], atol=1e-5, rtol=0, msg=name)


def test_a_bfloat16_lora_output_subtracts_the_base_in_float32(adapters, weights):
    # The dense update of a non-linear method was formed from the merged weight already rounded to bfloat16: an
    # error of |W|·2⁻⁹, swamping the small updates of real fine-tunes. Now it is exact before the factors' rounding.
    from splice.merge.config import load_config
    from splice.merge.lora_merge import LoraMerge
    from splice.merge.plan import build_plan

    base, loras, _ = adapters
    config = {"merge_method": "ties", "base_model": str(base), "models": models(loras),
              "parameters": {"density": 0.5}}
    model = weights(merge(config, base.parent / "ties-model", progress=False))
    plan = build_plan(load_config({**config, "out_dtype": "bfloat16"})[0])
    try:
        lora, base_w = LoraMerge(plan, rank=64), weights(base)
        for name in lora.parts:
            _, kind, A, B = lora.module(name)
            want = model[name] - base_w[name]
            torch.testing.assert_close(B @ A, want, atol=1e-5, rtol=0, msg=name)
    finally:
        plan.inputs.close()


def test_lora_rank_on_a_weighted_sum_never_forms_the_dense_update(adapters, weights, tmp_path):
    base, loras, _ = adapters
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "models": models(loras, (0.7, 0.3))}
    exact = weights(merge(config, tmp_path / "model", progress=False))
    out = merge(config, tmp_path / "r3", progress=False, lora_rank=3)
    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 3 and all(v <= 3 for v in (peft_cfg["rank_pattern"] or {}).values())
    applied = weights(apply_adapter(str(base), out, tmp_path / "applied", progress=False))
    base_w = weights(base)
    name = "model.layers.0.self_attn.q_proj.weight"  # rank 4 + 2 = 6 → truncated to 3
    target = (exact[name] - base_w[name]).double()
    err = (applied[name] - exact[name]).double().norm().item()
    assert err == pytest.approx(torch.linalg.svdvals(target)[3:].norm().item(), abs=1e-5)


def test_lora_output_errors(adapters, family, lora, tmp_path):
    base, loras, dense = adapters
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "models": models([loras[0], dense[1]])}
    with pytest.raises(SpliceError, match=r"models\[1\].*is not a LoRA adapter of base_model"):
        merge(config, tmp_path / "out", progress=False, out_format="lora")
    dora = lora(base, tmp_path / "dora", 5, r=2, dora=True)
    config["models"] = models([loras[0], dora])
    with pytest.raises(SpliceError, match="is a DoRA adapter.*--lora-rank"):
        merge(config, tmp_path / "out", progress=False, out_format="lora")
    assert merge(config, tmp_path / "out", progress=False, lora_rank=8).is_dir()  # by SVD it works
    with pytest.raises(SpliceError, match="needs out_format 'lora'"):
        merge(config, tmp_path / "out2", progress=False, out_format="model", lora_rank=2)
    with pytest.raises(SpliceError, match="merge_method 'fisher' needs fisher from calibration texts.*merge to a "
                                          "model"):  # the LoRA path would merge without them: a plain average
        merge({**config, "merge_method": "fisher", "models": models(loras)}, tmp_path / "fisher", progress=False,
              out_format="lora")
    report = merge({**config, "models": models(loras)}, tmp_path / "dry", dry_run=True, out_format="lora")
    assert "lora output:" in str(report) and "exact rank concatenation" in str(report)
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("method, fields", [
    ("ia3", dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])),
    ("lokr", dict(r=2, target_modules=["q_proj", "v_proj"])),
])
def test_other_methods_merge_as_their_delta_and_are_refused_as_lora_output(adapters, weights, tmp_path, method,
                                                                           fields):
    """An adapter of another method is a merge input through its delta (IA3's Scale is measured against the base);
    task arithmetic with weight 1 of that adapter alone is the adapter merged into the base."""
    import splice
    from transformers import AutoModelForCausalLM

    base = adapters[0]
    model = splice.adapt(AutoModelForCausalLM.from_pretrained(base), splice.adapters.make_config(method, **fields))
    with torch.no_grad():
        for p in splice.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    splice.save_adapter(model, tmp_path / method)
    config = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(tmp_path / method), "parameters": {"weight": 1.0}}]}
    merged = weights(merge(config, tmp_path / "merged", progress=False))
    expected, before = splice.merge_and_unload(model).state_dict(), weights(base)
    changed = 0
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor.float(), expected[name].float(), atol=1e-5, rtol=0, msg=name)
        changed += not torch.equal(tensor.float(), before[name].float())
    assert changed >= 2
    with pytest.raises(SpliceError, match=f"is a {method} adapter"):
        merge(config, tmp_path / "lora", progress=False, out_format="lora")


def test_peft_linear_is_not_the_weighted_sum(family, lora, tmp_path):
    """PEFT's add_weighted_adapter 'linear' merges A and B separately (A = Σ√(w s) A_i, B = Σ√(w s) B_i): its
    product has cross terms B_i A_j. 'cat' (and splice's concatenation) is the weighted sum itself.

    Measured here (two rank-4 adapters, weights 0.7 / 0.3, 6 modules), mean relative error of the merged update:
    PEFT linear 0.855, PEFT cat 8.5e-08, splice 8.7e-08."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fam = family("llama", n=0, layers=2)
    loras = [lora(fam.base, tmp_path / f"lora-{i}", i, r=4, alpha=8) for i in range(2)]
    w = (0.7, 0.3)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fam.base), loras[0], adapter_name="a")
    model.load_adapter(loras[1], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], list(w), "linear", combination_type="linear")
    model.add_weighted_adapter(["a", "b"], list(w), "cat", combination_type="cat")
    config = {"merge_method": "task_arithmetic", "base_model": str(fam.base), "models": models(loras, w)}
    ours = merge(config, tmp_path / "ours", progress=False, out_format="lora")
    ours_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fam.base), ours, adapter_name="s")

    def update(peft_model, name, layer):
        return layer.lora_B[name].weight @ layer.lora_A[name].weight * layer.scaling[name]

    rel = {"linear": [], "cat": [], "splice": []}
    for (path, layer), (_, ours_layer) in zip(
            [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and "a" in m.lora_A],
            [(n, m) for n, m in ours_model.named_modules() if hasattr(m, "lora_A") and "s" in m.lora_A]):
        exact = sum(wi * update(model, n, layer) for wi, n in zip(w, ("a", "b")))
        for key, got in (("linear", update(model, "linear", layer)), ("cat", update(model, "cat", layer)),
                         ("splice", update(ours_model, "s", ours_layer))):
            rel[key].append(((got - exact).norm() / exact.norm()).item())
    assert len(rel["cat"]) == 6
    assert min(rel["linear"]) > 0.2, rel["linear"]
    assert max(rel["cat"]) < 1e-6 and max(rel["splice"]) < 1e-6


def test_a_lora_input_in_a_slice_of_other_layers_than_the_base_merges_as_its_dense_model(family, lora, weights,
                                                                                          tmp_path):
    # Its own delta is the task vector only against the same layer of the base: paired with base layer k, layer
    # 2+k's task vector is (W_{2+k} + Δ_{2+k}) − W_k, not Δ_{2+k} (a difference of up to 5 in q_proj before).
    fam = family("llama", n=0, layers=4)
    adapter = lora(fam.base, tmp_path / "lora", 0, r=4, alpha=8)
    dense = densify(fam.base, adapter, tmp_path / "dense")

    def config(second: str) -> dict:
        return {"merge_method": "task_arithmetic", "base_model": str(fam.base), "slices": [{"sources": [
            {"model": str(fam.base), "layer_range": [0, 2]},
            {"model": second, "layer_range": [2, 4], "parameters": {"weight": 1.0}}]}]}
    ours = weights(merge(config(f"{fam.base}+{adapter}"), tmp_path / "from-adapter", progress=False))
    want = weights(merge(config(str(dense)), tmp_path / "from-dense", progress=False))
    for name in want:
        torch.testing.assert_close(ours[name], want[name], atol=1e-5, rtol=0, msg=name)
