"""The merge executor end to end on tiny saved models: complete output folders, streaming, layer stacking, and bad
inputs that must fail with one line and write nothing."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import splice.merge.executor as executor
from splice.cli import run as cli
from splice.errors import SpliceError
from splice.merge import MergeReport, merge
from splice.merge.inputs import ModelFolder


def ta_config(fam, **extra):
    return {"merge_method": "task_arithmetic", "base_model": str(fam.base),
            "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fam.fts, (0.7, 0.4, 0.2))],
            **extra}


def nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def fails(config, out, match, **kw) -> str:
    with pytest.raises(SpliceError, match=match) as info:
        merge(config, out, progress=False, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------------------------- the output folder
def test_output_is_a_complete_sharded_hf_folder(family, write_yaml, weights, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = family("llama", n=2)
    path = write_yaml(ta_config(fam, out_dtype="bfloat16"))
    out = merge(path, tmp_path / "out", max_shard_bytes=20_000)  # ~120 KB of bf16 weights → several shards
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 2 and all(n.startswith("model-0000") for n in shards)
    assert {"config.json", "model.safetensors.index.json", "README.md", "tokenizer.json",
            "tokenizer_config.json"} <= set(names)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    config = json.loads((out / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
    assert path.read_text().strip() in (out / "README.md").read_text()  # the card holds the exact config
    assert "task_arithmetic" in (out / "README.md").read_text()

    base, a, b = weights(fam.base), weights(fam.fts[0]), weights(fam.fts[1])
    got = weights(out)
    assert set(got) == set(base)
    for name, w in got.items():
        assert w.dtype == torch.bfloat16
        want = (base[name] + 0.7 * (a[name] - base[name]) + 0.4 * (b[name] - base[name])).bfloat16()
        torch.testing.assert_close(w, want, atol=0, rtol=2 ** -7)  # at most one bf16 rounding apart
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    logits = model(**tokenizer("w1 w2 w3", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    err = capsys.readouterr().err
    assert "merging" in err and "B/s" in err  # the progress bar shows bytes per second


def test_dry_run_validates_and_writes_nothing(family, write_yaml, tmp_path, capsys):
    fam = family("llama", n=3)
    report = merge(write_yaml(ta_config(fam)), tmp_path / "out", dry_run=True, progress=False)
    assert isinstance(report, MergeReport)
    assert report.num_tensors == 3 + 4 * 9 and report.num_layers == 4  # embed, norm, lm_head + 9 per layer
    assert "task_arithmetic" in str(report) and "models[2]" in str(report) and "weight[1]: 0.4" in str(report)
    nothing_written(tmp_path, tmp_path / "out")
    assert cli(["merge", str(write_yaml(ta_config(fam))), str(tmp_path / "out"), "--dry-run"]) == 0
    assert "output: 39 tensors" in capsys.readouterr().out
    nothing_written(tmp_path, tmp_path / "out")


def test_gpt2_tied_head_stays_tied(family, weights, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = family("gpt2", n=2, layers=2)
    out = merge(ta_config(fam), tmp_path / "out", progress=False)
    got = weights(out)
    assert "lm_head.weight" not in got and set(got) == set(weights(fam.base))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(model.transformer.wte.weight, got["transformer.wte.weight"])


def test_a_tied_checkpoint_stands_in_for_the_base_lm_head(family, weights, tmp_path):
    """A fine-tune saved with tied embeddings has no lm_head.weight; its embedding is its head."""
    fam = family("llama", n=2, layers=2)
    file = fam.fts[1] / "model.safetensors"
    tensors = load_file(file)
    tensors.pop("lm_head.weight")
    save_file(tensors, str(file), metadata={"format": "pt"})
    got = weights(merge(ta_config(fam), tmp_path / "out", progress=False))
    base, a = weights(fam.base), weights(fam.fts[0])
    want = base["lm_head.weight"] + 0.7 * (a["lm_head.weight"] - base["lm_head.weight"]) + \
        0.4 * (tensors["model.embed_tokens.weight"] - base["lm_head.weight"])
    torch.testing.assert_close(got["lm_head.weight"], want)


def test_reads_one_tensor_name_at_a_time(family, tmp_path, monkeypatch):
    """Streaming: every read of a name happens together, before the next name is read (memory O(one name))."""
    fam = family("llama", n=3, layers=2)
    reads = []
    original = ModelFolder.get
    monkeypatch.setattr(ModelFolder, "get", lambda self, name, **kw: reads.append(name) or original(self, name, **kw))
    merge(ta_config(fam), tmp_path / "out", progress=False)
    runs = [n for i, n in enumerate(reads) if i == 0 or reads[i - 1] != n]
    assert len(runs) == len(set(reads)) == 3 + 2 * 9
    assert len(reads) == 4 * len(runs)  # base + 3 fine-tunes, each read once


def test_frankenmerge_slices_renumber_layers(family, weights, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = family("llama", n=2, layers=4)
    method = "passthrough"
    config = {"merge_method": method, "slices": [
        {"sources": [{"model": str(fam.fts[0]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(fam.fts[1]), "layer_range": [1, 4]}]}]}
    out = merge(config, tmp_path / "out", progress=False)
    got, a, b = weights(out), weights(fam.fts[0]), weights(fam.fts[1])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    layer = "model.layers.{}.mlp.down_proj.weight"
    for i in range(3):
        assert torch.equal(got[layer.format(i)], a[layer.format(i)])
        assert torch.equal(got[layer.format(3 + i)], b[layer.format(1 + i)])
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # from the first slice
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])  # from the last slice
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6
    # A base_model that passthrough ignores need not be among every slice's sources (mergekit accepts it).
    again = weights(merge({**config, "base_model": str(fam.fts[0])}, tmp_path / "with-base", progress=False))
    assert all(torch.equal(again[k], got[k]) for k in got)


def test_t5_blocks_are_its_layers_and_a_frankenmerge_of_two_stacks_is_refused(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from splice.merge.plan import layer_of

    assert layer_of("encoder.block.3.layer.1.DenseReluDense.wi.weight").group(1) == "3"  # the block, not sub-layer
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)) \
        .save_pretrained(tmp_path / "t5")
    config = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(tmp_path / "t5"),
                                                                       "layer_range": [0, 1]}]}]}
    fails(config, tmp_path / "out", "has 2 layer stacks \\(decoder, encoder\\); a frankenmerge")



def test_gradient_parameters_run_along_each_layer_stack_on_its_own_depth(tmp_path):
    # A 2-layer encoder beside a 4-layer decoder: a gradient [1, 0] ends at the last block of each stack, as
    # mergekit plans each module on its own; one index space for both would stop the encoder at t = 1/3.
    from transformers import T5Config, T5ForConditionalGeneration

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                            num_decoder_layers=4, num_heads=2)).save_pretrained(tmp_path / f"m{seed}")
        paths.append(tmp_path / f"m{seed}")
    config = {"merge_method": "linear", "models": [{"model": str(paths[0]), "parameters": {"weight": [1.0, 0.0]}},
                                                   {"model": str(paths[1]), "parameters": {"weight": [0.0, 1.0]}}]}
    got = load_file(merge(config, tmp_path / "out", progress=False) / "model.safetensors")
    a, b = (load_file(p / "model.safetensors") for p in paths)
    name = "encoder.block.{}.layer.0.SelfAttention.q.weight"
    torch.testing.assert_close(got[name.format(0)], a[name.format(0)])  # t = 0: the first model alone
    torch.testing.assert_close(got[name.format(1)], b[name.format(1)])  # t = 1 at the encoder's last block
    dec = "decoder.block.{}.layer.0.SelfAttention.q.weight"
    torch.testing.assert_close(got[dec.format(3)], b[dec.format(3)])
    torch.testing.assert_close(got[dec.format(1)], (2 * a[dec.format(1)] + b[dec.format(1)]) / 3)  # t = 1/3

def test_frankenmerge_takes_gpt_neox_output_head_from_the_last_slice(weights, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    for seed in (0, 1):
        torch.manual_seed(seed)
        GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / f"nx{seed}")
    config = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tmp_path / "nx0"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(tmp_path / "nx1"), "layer_range": [0, 2]}]}]}
    got = weights(merge(config, tmp_path / "out", progress=False))
    first, last = weights(tmp_path / "nx0"), weights(tmp_path / "nx1")
    assert torch.equal(got["gpt_neox.embed_in.weight"], first["gpt_neox.embed_in.weight"])
    assert torch.equal(got["embed_out.weight"], last["embed_out.weight"])  # the head, like final_layer_norm
    assert torch.equal(got["gpt_neox.final_layer_norm.weight"], last["gpt_neox.final_layer_norm.weight"])


def test_random_methods_are_reproducible_from_the_seed(family, tmp_path):
    fam = family("llama", n=2, layers=2)
    config = {**ta_config(fam), "merge_method": "dare_ties", "parameters": {"density": 0.5}}
    runs = [merge(config, tmp_path / f"out{i}", progress=False, seed=s) for i, s in enumerate((7, 7, 8))]
    first, again, other = (load_file(o / "model.safetensors") for o in runs)
    assert "`splice merge config.yaml OUT --seed 7` reproduces it" in (runs[0] / "README.md").read_text()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)



def test_buffers_an_older_base_checkpoint_saved_are_left_out_not_refused(family, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    fam = family("llama", n=2, layers=2)
    file = fam.base / "model.safetensors"
    tensors = load_file(file)  # as transformers < 4.31 saved a Llama: RoPE frequencies and positions in the file
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    tensors["model.position_ids"] = torch.arange(16)[None]
    save_file(tensors, str(file), metadata={"format": "pt"})
    out = merge(ta_config(fam), tmp_path / "out", progress=False)
    got = load_file(out / "model.safetensors")
    assert not any(k.endswith(("inv_freq", "position_ids")) for k in got)
    assert set(got) == set(load_file(fam.fts[0] / "model.safetensors"))
    assert "note: 2 buffer(s) that some inputs lack are not written" in capsys.readouterr().err
    AutoModelForCausalLM.from_pretrained(out)  # loads as any checkpoint without them
    ft = load_file(fam.fts[0] / "model.safetensors")
    del ft["model.layers.0.self_attn.k_proj.weight"]  # a weight the base has is still refused
    save_file(ft, str(fam.fts[0] / "model.safetensors"), metadata={"format": "pt"})
    fails(ta_config(fam), tmp_path / "out2", "tensor 'model.layers.0.self_attn.k_proj.weight' is missing")

# ----------------------------------------------------------------------------------------------- bad inputs
def test_a_result_too_large_for_float16_is_refused_not_written_as_inf(family, tmp_path):
    fam = family("llama", n=1, layers=2)
    config = ta_config(fam, out_dtype="float16")
    config["models"][0]["parameters"]["weight"] = 1e7  # deltas of ~0.05 become ~5e5, past float16's 65504
    text = fails(config, tmp_path / "out", "beyond float16; lower the weights or pick a wider out_dtype")
    assert "task_arithmetic" in text
    nothing_written(tmp_path, tmp_path / "out")



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_method_result_is_checked_once_and_its_fault_named(dtype):
    from splice.errors import SpliceError
    from splice.merge.executor import _finished

    ok = torch.randn(4, 8)
    assert torch.equal(_finished(ok, dtype, "ties", "w"), ok.to(dtype))
    nan = ok.clone()
    nan[1, 2] = math.nan  # the method's own NaN is named as such, whatever the output dtype
    with pytest.raises(SpliceError, match="merge method 'ties': tensor 'w' holds NaN values"):
        _finished(nan, dtype, "ties", "w")
    if dtype == torch.float16:
        with pytest.raises(SpliceError, match="has values up to 1e\\+05, beyond float16"):
            _finished(ok * 0 + 1e5, dtype, "ties", "w")

def test_a_dry_run_checks_parameter_values_and_passes_every_method_with_sane_ones(family, tmp_path):
    from splice.bench.merging import config as method_config, settings
    from splice.merge.methods.registry import get_merge_method, merge_method_names

    fam = family("llama", n=2, layers=2)
    for name in merge_method_names():
        method = get_merge_method(name)
        if method.needs:
            continue
        setting = settings(method, (0.5,), (0.5,))[0]
        try:
            report = merge(method_config(name, fam.base, fam.fts, setting), tmp_path / name, dry_run=True)
        except SpliceError as err:  # a method of one model (nearswap, passthrough): the dry run now says so
            assert "takes exactly 1 model" in str(err), (name, err)
            report = merge(method_config(name, fam.base, fam.fts[:1], setting), tmp_path / name, dry_run=True)
        assert report.num_tensors > 0, name
    bad = {**ta_config(fam), "merge_method": "ties", "parameters": {"density": 1.5}}
    fails(bad, tmp_path / "out", r"ties: parameter 'density' must be in \[0.0, 1.0\]", dry_run=True)


def test_a_tokenizer_source_of_another_vocabulary_is_refused(family, tmp_path):
    # mergekit realigns the embeddings to such a tokenizer; splice copies tokenizer files only, so it must refuse.
    fam = family("llama", n=1, layers=2)
    other = tmp_path / "other-vocab"
    shutil.copytree(fam.base, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 20}))
    text = fails(ta_config(fam, tokenizer_source=str(other)), tmp_path / "out",
                 "tokenizer_source: .* has a vocabulary of 120 tokens, the merged model's embeddings 100 rows")
    assert "pick a model with the same vocabulary" in text
    nothing_written(tmp_path, tmp_path / "out")
    assert merge(ta_config(fam, tokenizer_source=str(fam.fts[0])), tmp_path / "same", dry_run=True).num_tensors


def test_fingerprints_accept_the_same_base_stored_in_bfloat16():
    from splice.delta.deltaset import fingerprints_match, tensor_fingerprint

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g) * torch.logspace(-3, 2, 64)  # heavy-tailed: entries far above the RMS
    assert fingerprints_match(tensor_fingerprint(w), tensor_fingerprint(w.bfloat16().float()))
    assert not fingerprints_match(tensor_fingerprint(w), tensor_fingerprint(w + 0.05 * w.std()))


def test_existing_output_needs_force(family, tmp_path):
    fam = family("llama", n=2, layers=2)
    out = tmp_path / "out"
    out.mkdir()
    fails(ta_config(fam), out, "output folder exists; pass --force")


def test_different_architectures(family, tmp_path):
    llama, gpt2 = family("llama", n=1, layers=2), family("gpt2", n=1, layers=2)
    config = ta_config(llama)
    config["models"][0]["model"] = str(gpt2.fts[0])
    text = fails(config, tmp_path / "out", "architecture")
    assert "models[0]" in text and str(gpt2.fts[0]) in text and "GPT2LMHeadModel" in text
    nothing_written(tmp_path, tmp_path / "out")


def test_different_shapes(family, tmp_path):
    small, wide = family("llama", n=1, layers=2), family("llama", n=1, layers=2, hidden=48)
    config = ta_config(small)
    config["models"][0]["model"] = str(wide.fts[0])
    text = fails(config, tmp_path / "out", r"has shape \(100, 48\), but")
    assert "models[0]" in text and str(wide.fts[0]) in text and "model.embed_tokens.weight" in text
    nothing_written(tmp_path, tmp_path / "out")


def test_different_layer_counts(family, tmp_path):
    two, three = family("llama", n=1, layers=2), family("llama", n=1, layers=3)
    config = ta_config(two)
    config["models"][0]["model"] = str(three.fts[0])
    fails(config, tmp_path / "out", "has 3 layers")
    nothing_written(tmp_path, tmp_path / "out")


def test_missing_tensor(family, tmp_path):
    fam = family("llama", n=2, layers=2)
    file = fam.fts[1] / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    text = fails(ta_config(fam), tmp_path / "out", "tensor 'model.layers.1.mlp.up_proj.weight' is missing")
    assert text.startswith(f"models[1] {fam.fts[1]}:")
    nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_in_an_input(family, tmp_path, bad):
    fam = family("llama", n=2, layers=2)
    file = fam.fts[0] / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.1.self_attn.k_proj.weight"][3, 5] = bad
    save_file(tensors, str(file), metadata={"format": "pt"})
    what = "NaN" if math.isnan(bad) else "inf"
    text = fails(ta_config(fam), tmp_path / "out", f"tensor 'model.layers.1.self_attn.k_proj.weight' holds {what}")
    assert text.startswith(f"models[0] {fam.fts[0]}:")
    nothing_written(tmp_path, tmp_path / "out")


def test_truncated_shard(family, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = family("llama", n=2, layers=2)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(fam.fts[0]).save_pretrained(sharded, max_shard_size="20KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    config = ta_config(fam)
    config["models"][0]["model"] = str(sharded)
    text = fails(config, tmp_path / "out", "truncated")
    assert shard.name in text and "models[0]" in text
    nothing_written(tmp_path, tmp_path / "out")


def test_lora_made_for_another_base(family, tmp_path):
    import splice

    fam, other = family("llama", n=1, layers=2), family("llama", n=1, layers=2, seed=1)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fam.base)
    splice.adapt(model, splice.LoraConfig(r=2, target_modules=["q_proj"]))
    splice.save_adapter(model, tmp_path / "adapter")  # records fingerprints of the base it was made on
    config = {"merge_method": "task_arithmetic", "base_model": str(other.base),
              "models": [{"model": str(tmp_path / "adapter"), "parameters": {"weight": 1.0}}]}
    text = fails(config, tmp_path / "out", "made for another base model")
    assert "models[0]" in text and "adapter" in text
    nothing_written(tmp_path, tmp_path / "out")
    config["base_model"] = None
    fails(config, tmp_path / "out", "needs base_model")


def test_bare_adapter_without_a_base_model(family, lora, tmp_path):
    fam = family("llama", n=1, layers=2)
    adapter = lora(fam.base, tmp_path / "adapter", 0)
    config = {"merge_method": "linear", "models": [{"model": str(adapter), "parameters": {"weight": 1.0}},
                                                   {"model": str(fam.fts[0]), "parameters": {"weight": 1.0}}]}
    fails(config, tmp_path / "out", "is a LoRA adapter folder.*set base_model")


def test_missing_model_folder_and_offline_hub_id(family, tmp_path, monkeypatch):
    fam = family("llama", n=1, layers=2)
    config = ta_config(fam)
    config["models"][0]["model"] = str(tmp_path / "nowhere")
    fails(config, tmp_path / "out", "models\\[0\\].*does not exist")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config["models"][0]["model"] = "someone/not-cached-model"
    fails(config, tmp_path / "out", "not a local folder and could not be fetched from the hub")


def test_method_needing_calibration(family, tmp_path):
    fam = family("llama", n=2, layers=2)
    config = {"merge_method": "regmean", "models": [{"model": str(f)} for f in fam.fts]}
    fails(config, tmp_path / "out", "needs gram computed from calibration texts", dry_run=True)


def test_interrupted_run_keeps_the_previous_output(family, tmp_path, monkeypatch):
    fam = family("llama", n=2, layers=2)
    out = merge(ta_config(fam), tmp_path / "out", progress=False, max_shard_bytes=30_000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len([n for n in before if n.endswith(".safetensors")]) > 2
    calls = []
    real = executor.merge_tensor

    def interrupted(plan, task, **kwargs):
        calls.append(task.name)
        if len(calls) == len(plan.tasks):
            raise KeyboardInterrupt  # Ctrl-C at the last tensor: earlier shards are complete on disk by then
        return real(plan, task, **kwargs)

    monkeypatch.setattr(executor, "merge_tensor", interrupted)
    changed = {**ta_config(fam), "out_dtype": "float16"}
    with pytest.raises(KeyboardInterrupt):
        merge(changed, out, force=True, progress=False, max_shard_bytes=30_000)
    assert len(calls) > 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_cli_errors_are_one_line(family, write_yaml, tmp_path, capsys):
    fam = family("llama", n=1, layers=2)
    path = write_yaml({**ta_config(fam), "merge_method": "ties_merging"})
    capsys.readouterr()  # drop what building the models printed
    assert cli(["merge", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: merge_method: unknown merge_method 'ties_merging'") and "\n" not in err
    assert cli(["merge", str(path), str(tmp_path / "out"), "--out-format", "lorra"]) == 2
    assert "did you mean 'lora'" in capsys.readouterr().err
    good = write_yaml(ta_config(fam))  # --lora-rank implies --out-format lora, as splice.merge(lora_rank=) does
    assert cli(["merge", str(good), str(tmp_path / "out"), "--lora-rank", "2", "--dry-run"]) == 2
    assert "is not a LoRA adapter of base_model" in capsys.readouterr().err  # so its inputs must be LoRAs
    assert cli(["merge", str(good), str(tmp_path / "out"), "--lora-rank", "2", "--out-format", "model"]) == 2
    assert "--lora-rank writes a LoRA; it cannot go with --out-format model" in capsys.readouterr().err
    assert cli(["merge", "--help"]) == 0
    assert "Example:" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "linear"])
def test_parallel_workers_write_the_same_bytes(family, tmp_path, monkeypatch, method):
    """Tensors merged side by side (and large ones in row blocks) give the bytes of the one-at-a-time merge."""
    from splice.merge import blocks

    fam = family("llama", n=3, layers=2)
    params = {"linear": {}, "della": {"density": 0.5, "epsilon": 0.1}}.get(method, {"density": 0.5})
    config = {**ta_config(fam), "merge_method": method, "parameters": params}
    if method == "linear":
        del config["base_model"]
    one = merge(config, tmp_path / "one", progress=False, seed=3, workers=1)
    monkeypatch.setattr(blocks, "MIN_ELEMENTS", 2048)  # the embeddings and MLP weights go through row blocks
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 512)
    many = merge(config, tmp_path / "many", progress=False, seed=3, workers=3)
    a, b = load_file(one / "model.safetensors"), load_file(many / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if method in ("dare_ties", "della"):  # the L1 rescale factor is summed block by block: float rounding
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a[key], b[key]), key
    # The worker count alone (the same block settings) changes not one byte, whatever the method.
    again = load_file(merge(config, tmp_path / "many-1", progress=False, seed=3, workers=1) / "model.safetensors")
    assert all(torch.equal(again[key], b[key]) for key in b)


def test_parallel_workers_restore_torch_threads(family, weights, tmp_path):
    fam = family("llama", n=2, layers=2)
    threads = torch.get_num_threads()
    out = merge(ta_config(fam), tmp_path / "out", progress=False, workers=3)
    assert torch.get_num_threads() == threads
    assert weights(out).keys() == weights(fam.base).keys()


def test_interrupted_parallel_run_leaves_nothing(family, tmp_path, monkeypatch):
    fam = family("llama", n=2, layers=2)
    real = executor.merge_tensor
    calls = []

    def interrupted(plan, task, **kwargs):
        calls.append(task.name)
        if len(calls) == 5:
            raise KeyboardInterrupt  # in a worker thread: the main thread re-raises it
        return real(plan, task, **kwargs)

    monkeypatch.setattr(executor, "merge_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge(ta_config(fam), tmp_path / "out", progress=False, workers=3)
    assert [p.name for p in tmp_path.iterdir() if p.name == "out" or p.name.startswith(".out.")] == []


def test_workers_must_be_positive(family, tmp_path):
    fam = family("llama", n=2, layers=2)
    fails(ta_config(fam), tmp_path / "out", "workers: must be at least 1", workers=0)
