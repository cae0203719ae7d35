"""Bad input gives a one-line `SpliceError` naming what is at fault (and, where it can, what was meant), and leaves
the model as it was."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import splice
from splice.adapters import make_config


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(splice.SpliceError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


def state(model: nn.Module) -> tuple[dict[str, type], dict[str, bool]]:
    """What a refused operation must not change: module types and which parameters train."""
    return ({n: type(m) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def saved_adapter(tiny, tmp_path, model_name="bert", seed=0, name="adapter", **fields):
    fields = {"r": 2, "target_modules": ["query", "value"], **fields}
    model = splice.adapt(tiny[model_name].build(seed=seed), splice.LoraConfig(**fields))
    with torch.no_grad():
        for p in splice.trainable_parameters(model):
            p.add_(0.1)
    return splice.save_adapter(model, tmp_path / name), model


# -- configs and targets -------------------------------------------------------------------------------------------
def test_target_matching_nothing_lists_close_names(bert):
    before = state(bert)
    msg = error(splice.adapt, bert, splice.LoraConfig(target_modules=["qeury", "vlaue"]))
    assert "qeury" in msg and "'query'" in msg and "BertModel" in msg
    assert state(bert) == before


@pytest.mark.parametrize("family, wrapped", [
    ("bert", {"query", "value"}), ("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"})])
def test_unset_targets_are_the_architectures_query_and_value_projections(tiny, tmp_path, family, wrapped):
    """As PEFT resolves target_modules=None by model type; the saved folder records what was wrapped."""
    from splice.adapters.inject import adapter_layers

    model = tiny[family].build()
    config = splice.LoraConfig(r=2)
    assert config.target_modules is None
    splice.adapt(model, config)
    assert {n.rsplit(".", 1)[-1] for n, _ in adapter_layers(model)} == wrapped
    folder = splice.save_adapter(model, tmp_path / "a")
    assert set(json.loads((folder / "adapter_config.json").read_text())["target_modules"]) == wrapped
    other = "gpt2" if family != "gpt2" else "bert"  # the same config object on another architecture: its own
    splice.adapt(tiny[other].build(), config)
    assert set(config.target_modules) == ({"c_attn"} if other == "gpt2" else {"query", "value"})
    named = splice.LoraConfig(r=2, target_modules=["query"])  # a value the user set is kept
    splice.adapt(tiny["bert"].build(), named)
    splice.adapt(tiny["bert"].build(), named)
    assert named.target_modules == ["query"]


def test_unset_targets_on_an_unknown_architecture_name_the_modules(tiny):
    cnn = tiny["cnn"].build()
    before = state(cnn)
    msg = error(splice.adapt, cnn, splice.LoraConfig(r=2))
    assert "target_modules: not set" in msg and "no default" in msg and "all-linear" in msg and "conv1" in msg
    assert state(cnn) == before


def test_regex_target_matching_nothing(gpt2):
    msg = error(splice.adapt, gpt2, splice.LoraConfig(target_modules=r".*\.c_atn"))
    assert "c_atn" in msg and "c_attn" in msg


def test_target_that_cannot_be_wrapped_is_named(bert):
    msg = error(splice.adapt, bert, splice.LoraConfig(target_modules=["LayerNorm"]))
    assert "LayerNorm" in msg and "cannot wrap" in msg


def test_modules_to_save_matching_nothing(bert):
    msg = error(splice.adapt, bert, splice.LoraConfig(target_modules=["query"], modules_to_save=["poolr"]))
    assert "poolr" in msg and "'pooler'" in msg


def test_unknown_config_key_suggests_the_valid_one():
    msg = error(make_config, "lora", rnk=4)
    assert "'rnk'" in msg and "'r'" in msg
    msg = error(make_config, "dora", lora_alpah=4)
    assert "'lora_alpha'" in msg


def test_unknown_method_suggests_the_valid_one():
    msg = error(make_config, "lroa", r=4)
    assert "'lora'" in msg


@pytest.mark.parametrize("fields, field", [
    (dict(r=0), "r"), (dict(r=2.5), "r"), (dict(lora_dropout=1.0), "lora_dropout"), (dict(bias="some"), "bias"),
    (dict(init_lora_weights="xavier"), "init_lora_weights"), (dict(target_modules=[]), "target_modules"),
])
def test_invalid_values_name_the_field(fields, field):
    msg = error(make_config, "lora", **fields)
    assert msg.startswith(field) or f"{field}:" in msg


def test_dora_refuses_pissa():
    assert "pissa" in error(make_config, "dora", init_lora_weights="pissa")


def test_rank_larger_than_the_layer(bert):
    # PiSSA decomposes the weight, which has only 32 singular values; a plain LoRA of rank 64 is valid (PEFT takes
    # it, and splice must load PEFT's folders and its own PiSSA ones, saved at rank 2r).
    before = state(bert)
    msg = error(splice.adapt, bert, splice.LoraConfig(r=64, target_modules=["query"], init_lora_weights="pissa"))
    assert "64" in msg and "32" in msg and "pissa" in msg
    assert state(bert) == before
    splice.adapt(bert, splice.LoraConfig(r=64, target_modules=["query"]))
    assert splice.trainable_parameters(bert)[0].shape[0] == 64


@pytest.mark.parametrize("method, fields, field", [
    ("ia3", dict(target_modules=["query"], feedforward_modules=["value"]), "feedforward_modules"),
    ("ia3", dict(init_ia3_weights="yes"), "init_ia3_weights"),
    ("loha", dict(r=0), "r"), ("loha", dict(rank_dropout=1.5), "rank_dropout"),
    ("loha", dict(rank_pattern={"query": 0}), "rank_pattern"), ("lokr", dict(decompose_factor=0), "decompose_factor"),
    ("lokr", dict(init_weights="olora"), "init_weights"), ("vera", dict(r=-1), "r"),
    ("vera", dict(vera_dropout=1.0), "vera_dropout"), ("shira", dict(mask_type="lowrank"), "mask_type"),
    ("adalora", dict(init_r=4, target_r=8), "target_r"), ("adalora", dict(beta1=1.0), "beta1"),
    ("adalora", dict(tinit=5, tfinal=5, total_step=10), "tinit"),
    ("oft", dict(r=4, oft_block_size=8), "r / oft_block_size"), ("oft", dict(module_dropout=1.0), "module_dropout"),
    ("boft", dict(boft_block_size=4, boft_block_num=8), "boft_block_size / boft_block_num"),
    ("boft", dict(boft_block_size=0), "boft_block_size / boft_block_num"),
    ("boft", dict(boft_block_size=-4), "boft_block_size"), ("boft", dict(boft_dropout=1.0), "boft_dropout"),
    ("boft", dict(boft_n_butterfly_factor=0), "boft_n_butterfly_factor"),
])
def test_invalid_values_of_other_methods_name_the_field(method, fields, field):
    msg = error(make_config, method, **fields)
    assert msg.startswith(field) or f"{field}:" in msg


@pytest.mark.parametrize("method, model_name, fields, words", [
    ("loha", "bert", dict(r=64, target_modules=["query"]), ["r:", "64", "32"]),
    ("ia3", "bert", dict(target_modules=["word_embeddings"]), ["ia3", "Embedding"]),
    ("loha", "gpt2", dict(target_modules=["c_attn"]), ["loha", "Conv1D"]),
    ("lokr", "bert", dict(target_modules=["query", "word_embeddings"]), ["lokr", "Embedding"]),
    ("vera", "cnn", dict(target_modules=["head", "conv1"]), ["vera", "Conv2d"]),
    ("ln_tuning", "cnn", dict(target_modules=["act1"]), ["ln_tuning", "ReLU", "no parameters"]),
    ("shira", "bert", dict(r=17, target_modules=["query"]), ["r:", "17", "1024"]),
    ("shira", "gpt2", dict(target_modules=["c_attn"]), ["shira", "Conv1D"]),
    ("fourierft", "bert", dict(n_frequency=2000, target_modules=["query"]), ["n_frequency", "2000", "1024"]),
    ("fourierft", "cnn", dict(n_frequency=4, target_modules=["conv1"]), ["fourierft", "Conv2d"]),
    ("bitfit", "llama", dict(target_modules=["q_proj"]), ["bitfit", "Linear", "no bias"]),
    ("miss", "bert", dict(r=5, init_weights="bat", target_modules=["query"]), ["r:", "does not divide", "32"]),
    ("miss", "bert", dict(r=4, mini_r=5, init_weights="mini", target_modules=["query"]), ["mini_r", "5", "32"]),
    ("miss", "bert", dict(r=40, target_modules=["query"]), ["r:", "40", "32"]),
    ("miss", "gpt2", dict(r=4, target_modules=["c_attn"]), ["miss", "Conv1D"]),
    ("adalora", "bert", dict(init_r=40, target_r=8, target_modules=["query"]), ["init_r", "40", "32"]),
    ("adalora", "bert", dict(target_modules=["word_embeddings"]), ["adalora", "Embedding"]),
    ("randlora", "cnn", dict(r=2, target_modules=["conv1"]), ["randlora", "Conv2d"]),
    ("oft", "bert", dict(oft_block_size=5, target_modules=["query"]), ["oft_block_size", "5", "32"]),
    ("oft", "bert", dict(r=3, oft_block_size=0, target_modules=["query"]), ["r", "3", "32", "does not divide"]),
    ("oft", "bert", dict(target_modules=["word_embeddings"]), ["oft", "Embedding"]),
    ("boft", "bert", dict(boft_block_size=5, target_modules=["query"]),
     ["boft_block_size", "5", "32", "does not divide"]),
    ("boft", "bert", dict(boft_block_size=0, boft_block_num=3, target_modules=["query"]),
     ["boft_block_num", "3", "32", "does not divide"]),
    ("boft", "bert", dict(boft_block_size=8, boft_n_butterfly_factor=4, target_modules=["query"]),
     ["boft_n_butterfly_factor", "multiple of 8 blocks", "4 blocks of 8", "32"]),
    ("boft", "bert", dict(boft_block_size=0, boft_block_num=32, boft_n_butterfly_factor=2, target_modules=["query"]),
     ["boft_n_butterfly_factor", "even block size", "32 blocks of 1"]),
    ("boft", "gpt2", dict(target_modules=["c_attn"]), ["boft", "Conv1D"]),
])
def test_a_method_refuses_what_it_cannot_wrap_before_touching_the_model(tiny, method, model_name, fields, words):
    model = tiny[model_name].build()
    before = state(model)
    msg = error(splice.adapt, model, make_config(method, **fields))
    for w in words:
        assert w in msg
    assert state(model) == before and splice.active_adapters(model) == []


def test_adapter_name_with_slash_or_dot_is_refused(bert):
    for name in ("a/b", "a.b", ""):
        msg = error(splice.adapt, bert, splice.LoraConfig(target_modules=["query"]), name)
        assert repr(name) in msg
    assert splice.active_adapters(bert) == []


def test_adding_a_name_twice_is_refused(bert):
    splice.adapt(bert, splice.LoraConfig(target_modules=["query"]), "a")
    assert "'a'" in error(splice.adapt, bert, splice.LoraConfig(target_modules=["value"]), "a")


def test_unknown_adapter_name_lists_the_known_ones(bert):
    splice.adapt(bert, splice.LoraConfig(target_modules=["query"]), "french")
    msg = error(splice.set_adapter, bert, "frnech")
    assert "'french'" in msg
    for fn in (splice.merge_adapter, splice.delete_adapter, splice.get_delta):
        assert "'french'" in error(fn, bert, "frnech")


def test_disable_while_merged_is_refused(bert):
    splice.adapt(bert, splice.LoraConfig(target_modules=["query"]))
    splice.merge_adapter(bert, "default")
    with pytest.raises(splice.SpliceError, match="unmerge"):
        with splice.disable_adapters(bert):
            pass


def test_mixed_batch_while_merged_is_refused(bert):
    """A merged adapter is in the base weights of every row, so a row asking for None or another adapter would
    silently get it too."""
    splice.adapt(bert, splice.LoraConfig(target_modules=["query"]), "a")
    splice.adapt(bert, splice.LoraConfig(target_modules=["query"]), "b")
    splice.merge_adapter(bert, "a")
    with pytest.raises(splice.SpliceError, match="unmerge"):
        with splice.mixed_batch(bert, ["b", None]):
            pass
    assert all(layer.row_groups is None for layer in bert.modules() if hasattr(layer, "row_groups"))


def test_mixed_batch_with_unknown_adapter_name(bert):
    splice.adapt(bert, splice.LoraConfig(target_modules=["query"]), "french")
    assert "'french'" in error(lambda: splice.mixed_batch(bert, ["french", "frnech"]).__enter__())


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_save_or_delta_of_a_merged_adapter_is_refused_and_works_after_unmerge(tiny, tmp_path, method):
    """Merged, the base weights include the adapter: its fingerprints, trained biases and (for DoRA and
    modules_to_save) its delta would be taken against the wrong weights."""
    fam = tiny["bert"]
    model = splice.adapt(fam.build(), make_config(method, r=2, target_modules="all-linear", bias="lora_only"))
    with torch.no_grad():
        for p in splice.trainable_parameters(model):
            p.add_(0.1)
    out = fam.output(model)
    splice.merge_adapter(model, "default")
    assert "unmerge" in error(splice.save_adapter, model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert "unmerge" in error(splice.get_delta, model, "default")
    splice.unmerge_adapter(model, "default")
    splice.save_adapter(model, tmp_path / "a")
    loaded = splice.load_adapter(fam.build(), tmp_path / "a")
    torch.testing.assert_close(fam.output(loaded), out, atol=1e-5, rtol=0)


def test_config_object_of_the_wrong_type(bert):
    assert "LoraConfig" in error(splice.adapt, bert, {"r": 4})


# -- loading -------------------------------------------------------------------------------------------------------
def test_load_into_a_base_of_other_shapes_names_the_tensor(tiny, tmp_path):
    path, _ = saved_adapter(tiny, tmp_path)
    other = tiny["bert"].build(hidden=48)
    before = state(other)
    msg = error(splice.load_adapter, other, path)
    assert "adapter_model.safetensors" in msg and "lora_A.weight" in msg and ".query" in msg
    assert "(2, 32)" in msg and "(2, 48)" in msg
    assert state(other) == before  # refused before anything was wrapped or frozen


def test_load_into_another_base_of_the_same_shapes_is_refused(tiny, tmp_path):
    path, _ = saved_adapter(tiny, tmp_path)
    other = tiny["bert"].build(seed=1)
    before = state(other)
    msg = error(splice.load_adapter, other, path)
    assert "made for another base" in msg and ".query.weight" in msg
    assert state(other) == before


def test_load_into_the_same_base_after_a_merge_round_trip_is_accepted(tiny, tmp_path):
    """Fingerprints compare with a tolerance: the float rounding of merge → unmerge does not make a base foreign."""
    path, model = saved_adapter(tiny, tmp_path)
    splice.merge_adapter(model, "default")
    splice.unmerge_adapter(model, "default")
    splice.load_adapter(model, path, "again")


def test_truncated_weights_file_is_named(tiny, tmp_path):
    path, _ = saved_adapter(tiny, tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    model = tiny["bert"].build()
    before = state(model)
    msg = error(splice.load_adapter, model, path)
    assert str(weights) in msg and "truncated" in msg
    assert state(model) == before


def test_missing_weights_file_is_named(tiny, tmp_path):
    path, _ = saved_adapter(tiny, tmp_path)
    (path / "adapter_model.safetensors").unlink()
    msg = error(splice.load_adapter, tiny["bert"].build(), path)
    assert str(path) in msg and "adapter_model.safetensors" in msg


@pytest.mark.parametrize("text, words", [
    ("{not json", ["invalid JSON", "line 1"]),
    ("[1, 2]", ["JSON object"]),
    ('{"peft_type": "LORA", "r": "four", "target_modules": ["query"]}', ["'four'"]),
    ('{"peft_type": "LORA", "r": 2, "lora_dropout": "lots", "target_modules": ["query"]}', ["'lots'"]),
    ('{"peft_type": "LORA", "r": 2, "bias": "some", "target_modules": ["query"]}', ["bias"]),
    ('{"peft_type": "LORA", "r": 2, "lora_alhpa": 4, "target_modules": ["query"], "use_qalora": true}',
     ["use_qalora"]),
    ('{"peft_type": "XLORA", "target_modules": ["query"]}', ["XLORA"]),
])
def test_invalid_adapter_config_is_named(tiny, tmp_path, text, words):
    path, _ = saved_adapter(tiny, tmp_path)
    (path / "adapter_config.json").write_text(text)
    msg = error(splice.load_adapter, tiny["bert"].build(), path)
    assert str(path / "adapter_config.json") in msg
    for w in words:
        assert w in msg


def test_missing_folder_is_named(bert, tmp_path):
    msg = error(splice.load_adapter, bert, tmp_path / "nowhere")
    assert "nowhere" in msg


def test_adapter_targeting_modules_the_base_lacks(tiny, tmp_path):
    path, _ = saved_adapter(tiny, tmp_path, model_name="llama", target_modules=["q_proj"])
    msg = error(splice.load_adapter, tiny["bert"].build(), path)
    assert "q_proj" in msg and "adapter_model.safetensors" in msg


def test_weights_file_missing_lora_b(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = saved_adapter(tiny, tmp_path)
    weights = path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if "lora_B" not in k}
    save_file(tensors, weights)
    msg = error(splice.load_adapter, tiny["bert"].build(), path)
    assert "expected both A and B" in msg and str(weights) in msg


def test_loading_under_a_taken_name_is_refused(tiny, tmp_path):
    path, model = saved_adapter(tiny, tmp_path)
    assert "'default'" in error(splice.load_adapter, model, path)


# -- saving --------------------------------------------------------------------------------------------------------
def test_save_to_an_existing_folder_needs_force(tiny, tmp_path):
    fam = tiny["bert"]
    path, _ = saved_adapter(tiny, tmp_path, r=2)
    _, second = saved_adapter(tiny, tmp_path, name="other", r=4, target_modules=["key"])
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    msg = error(splice.save_adapter, second, path)
    assert str(path) in msg and "exists" in msg
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # untouched

    splice.save_adapter(second, path, force=True)
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 4
    loaded = splice.load_adapter(fam.build(), path)
    torch.testing.assert_close(fam.output(loaded), fam.output(second), atol=1e-5, rtol=0)
    assert not list(tmp_path.glob(".adapter.*"))  # no temporary folders left behind


def test_save_unknown_adapter_name(bert, tmp_path):
    splice.adapt(bert, splice.LoraConfig(target_modules=["query"]), "mine")
    msg = error(splice.save_adapter, bert, tmp_path / "x", "yours")
    assert "'yours'" in msg and "mine" in msg
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("rows", [1, 3])
def test_mixed_batch_rows_must_match_the_batch(bert, rows):
    """Too few names would give the extra rows the base alone (silently); too many would fail deep in torch."""
    splice.adapt(bert, splice.LoraConfig(target_modules=["query"]), "a")
    ids = torch.randint(0, 100, (2, 5))
    with splice.mixed_batch(bert, ["a"] * rows):
        assert "for %d rows, but the batch has 2" % rows in error(lambda: bert(input_ids=ids))


def test_a_failing_extra_file_leaves_the_old_folder_whole(bert, tmp_path):
    # `splice train` writes the classifier head through `extra`: a failure there must not leave an adapter folder
    # without its head in place of the complete one that --force was replacing.
    splice.adapt(bert, make_config("lora", r=2, target_modules=["query"]))
    out = splice.save_adapter(bert, tmp_path / "a", extra=lambda folder: (folder / "head.txt").write_text("v1"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(folder):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        splice.save_adapter(bert, out, force=True, extra=boom)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name != "a"]  # no temporary folder left behind


def test_a_peft_folder_on_a_module_splice_cannot_wrap_is_one_line(tiny, tmp_path):
    # PEFT's OFT wraps Conv2d; splice's does not: the load said AttributeError (no in_features) before.
    import peft

    model = peft.get_peft_model(tiny["cnn"].build(), peft.OFTConfig(r=0, oft_block_size=4, target_modules=["conv2"]))
    model.save_pretrained(tmp_path / "oft")
    fresh = tiny["cnn"].build()
    before = state(fresh)
    msg = error(splice.load_adapter, fresh, tmp_path / "oft")
    assert "module 'conv2' is a Conv2d, which splice's oft cannot wrap" in msg
    assert state(fresh) == before
