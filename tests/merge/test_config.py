"""The merge config: mergekit's YAML schema, parameter gradients and filters, and one-line errors for every mistake."""
from __future__ import annotations

import pytest

from splice.errors import SpliceError
from splice.merge.config import MergeConfig, ModelRef, evaluate_setting, load_config

BASE = {"merge_method": "task_arithmetic", "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.3}}]}


def with_(**changes):
    return {**BASE, **changes}


def error(data) -> str:
    with pytest.raises(SpliceError) as info:
        load_config(data)
    text = str(info.value)
    assert "\n" not in text
    return text


# ----------------------------------------------------------------------------------------------- parsing
def test_the_fields_of_mergekit_yaml(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("""
merge_method: ties
base_model: org/base@main
models:
  - model: ./ft-a
    parameters: {weight: [0.2, 1.0], density: 0.5}
  - model: {model: {path: ./ft-b, revision: v2}, lora: ./adapter}
    parameters:
      weight: [{filter: self_attn, value: 0.3}, {value: [0.1, 0.9]}]
parameters: {normalize: true, lambda: 1.5}
dtype: torch.bfloat16
out_dtype: float16
tokenizer_source: base
chat_template: chatml
""")
    cfg, text = load_config(path)
    assert text.startswith("merge_method: ties")  # the file's own text, for the model card
    assert cfg.base_model == ModelRef(path="org/base", revision="main")
    assert cfg.models[1].model == ModelRef(path="./ft-b", revision="v2", lora="./adapter")
    assert str(cfg.models[1].model) == "./ft-b@v2+./adapter"
    assert cfg.dtype == "bfloat16" and cfg.out_dtype == "float16"
    assert cfg.notes() == ["chat_template is ignored: the tokenizer files are copied as they are"]
    again, _ = load_config(cfg.model_dump(mode="json", exclude_none=True))  # the dump loads back
    assert again == cfg


def test_model_reference_strings():
    assert ModelRef.model_validate("a+b") == ModelRef(path="a", lora="b")
    assert ModelRef.model_validate("org/m@rev+ad@r2") == ModelRef(path="org/m", revision="rev", lora="ad",
                                                                     lora_revision="r2")


def test_a_real_local_path_is_taken_literally(tmp_path):
    odd = tmp_path / "model+v1@x"
    odd.mkdir()
    assert ModelRef.model_validate(str(odd)) == ModelRef(path=str(odd))


def test_built_from_python_with_the_same_fields():
    cfg = MergeConfig(merge_method="linear", models=[{"model": "a", "parameters": {"weight": 1}},
                                                     {"model": "b", "parameters": {"weight": 2}}])
    assert [str(m.model) for m in cfg.models] == ["a", "b"]
    assert "merge_method: linear" in cfg.to_yaml()
    with pytest.raises(SpliceError, match=r"^models\[1\]\.parameters\.wieght: unknown parameter 'wieght'.*"
                                          r"did you mean 'weight'"):
        MergeConfig(merge_method="linear", models=[{"model": "a", "parameters": {"weight": 1}},
                                                   {"model": "b", "parameters": {"wieght": 2}}])


def test_slices_config():
    cfg, _ = load_config({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}]},
        {"sources": [{"model": "b", "layer_range": [1, 3]}], "residual_weight": 0.1}]})
    assert cfg.slices[1].sources[0].layer_range == (1, 3)
    assert any("residual_weight" in n for n in cfg.notes())


# ----------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("setting, name, t, want", [
    (0.5, "x", 0.7, 0.5),
    ([0.0, 1.0], "x", 0.25, 0.25),
    ([0.0, 1.0, 0.0], "x", 0.75, 0.5),  # piecewise linear between the points
    ([0.0, 1.0, 0.0], "x", 1.0, 0.0),
    ([{"filter": "mlp", "value": 2.0}, {"value": 1.0}], "layers.0.mlp.up", 0, 2.0),  # first matching filter wins
    ([{"filter": "mlp", "value": 2.0}, {"value": 1.0}], "layers.0.attn.q", 0, 1.0),
    ([{"filter": "mlp", "value": [0.0, 1.0]}], "mlp", 0.5, 0.5),  # a filter's value may be a gradient
    ([{"filter": "mlp", "value": 2.0}], "attn", 0, None),  # nothing matches: the next scope decides
    ({"filter": "*", "value": 3.0}, "anything", 0, 3.0),
])
def test_evaluate_setting(setting, name, t, want):
    assert evaluate_setting(setting, name, t) == pytest.approx(want) if want is not None else \
        evaluate_setting(setting, name, t) is None


def test_evaluate_setting_matches_mergekit_on_a_grid():
    import mergekit.config as mk
    from pydantic import TypeAdapter

    settings = [0.3, [0.1, 0.9], [0.0, 1.0, 0.25, 0.5], [1, 2, 3], ["a", "b", "c"], [True, False],
                [{"filter": "self_attn", "value": [0.2, 0.8]}, {"filter": "mlp", "value": 0.4}, {"value": [1, 0]}],
                [{"filter": "lm_head", "value": 5.0}]]
    names = ["model.layers.3.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight", "x"]
    kinds = {float: float, str: str, bool: bool}
    for setting in settings:
        leaves = [v for v in (setting if isinstance(setting, list) else [setting])]
        kind = next((k for k in kinds if isinstance(leaves[0], k) and not isinstance(leaves[0], dict)), float)
        theirs_setting = TypeAdapter(mk.ParameterSetting).validate_python(setting)
        for name in names:
            for t in (0.0, 0.1, 1 / 3, 0.5, 0.9, 1.0):
                ours = evaluate_setting(setting, name, t, kind)
                theirs = mk.evaluate_setting(name, theirs_setting, t, validate=TypeAdapter(kind).validate_python)
                assert ours == theirs, (setting, name, t)


# ----------------------------------------------------------------------------------------------- errors
def test_unknown_top_level_key_names_the_closest():
    assert error(with_(merge_methd="ties")) == \
        "config: merge_methd: unknown key 'merge_methd' (did you mean 'merge_method'?); valid: merge_method, " \
        "base_model, models, slices, parameters, dtype, out_dtype, tokenizer_source, tokenizer, chat_template, modules"


def test_unknown_nested_key_names_its_yaml_path():
    text = error(with_(models=[{"model": "a", "paramters": {"weight": 1}}]))
    assert text.startswith("config: models[0].paramters: unknown key 'paramters' (did you mean 'parameters'?)")
    text = error({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_rang": [0, 1]}]}]})
    assert "slices[0].sources[0].layer_rang: unknown key" in text and "'layer_range'" in text
    assert "unknown key 'fiter'" in error(with_(parameters={"lambda": [{"fiter": "mlp", "value": 1}]}))


def test_unknown_merge_method_names_the_closest():
    text = error(with_(merge_method="task_arithmetc"))
    assert "merge_method: unknown merge_method 'task_arithmetc' (did you mean 'task_arithmetic'" in text


def test_unknown_parameter_names_the_closest_valid_one():
    text = error(with_(parameters={"lamda": 1.0}))
    assert text.startswith("config: parameters.lamda: unknown parameter 'lamda' for merge_method 'task_arithmetic' "
                           "(did you mean 'lambda'?)")
    assert "valid: " in text and "weight" in text


def test_global_parameter_under_a_model_is_refused():
    text = error(with_(models=[{"model": "a", "parameters": {"weight": 1, "lambda": 2}}]))
    assert "models[0].parameters.lambda: 'lambda' is a global parameter" in text


def test_missing_required_parameter_is_named():
    text = error(with_(models=[{"model": "a", "parameters": {"weight": 1}}, {"model": "b"}]))
    assert text == "config: models[1]: missing required parameter 'weight' of merge_method 'task_arithmetic' " \
                   "for model 'b'"
    # a global value (or a slice's) counts for every model
    load_config(with_(models=[{"model": "a"}, {"model": "b"}], parameters={"weight": 0.5}))
    text = error({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]})
    assert "missing required parameter 't' of merge_method 'slerp'" in text


def test_a_base_merged_as_one_more_model_needs_its_parameters():
    text = error({"merge_method": "linear", "base_model": "base", "models": [{"model": "a", "parameters": {
        "weight": 1}}]})
    assert text.startswith("config: base_model: missing required parameter 'weight' of merge_method 'linear'")
    assert "merges base_model as one more model, as mergekit does" in text
    load_config({"merge_method": "linear", "base_model": "base", "models": [{"model": "a"}],
                 "parameters": {"weight": 1}})


def test_method_that_needs_a_base():
    assert "merge_method 'ties' needs base_model" in error({"merge_method": "ties", "models": [
        {"model": "a", "parameters": {"weight": 1}}]})


@pytest.mark.parametrize("value, want", [
    ("abc", "expected a number, got 'abc'"),
    ([0.1, "x"], "expected a number, got 'x'"),
    (None, "expected a scalar, a list of scalars"),
    ([[1, 2]], "expected a scalar, a list of scalars"),
    ([{"value": 1}, 2], "expected a scalar, a list of scalars"),
    ([{"filter": "mlp"}], "has no 'value'"),
])
def test_bad_parameter_values(value, want):
    text = error(with_(models=[{"model": "a", "parameters": {"weight": value}}, {"model": "b", "parameters":
                                                                                  {"weight": 1}}]))
    assert "models[0].parameters" in text and want in text


@pytest.mark.parametrize("changes, want", [
    ({"dtype": "bf16"}, "dtype: unknown dtype 'bf16'"),
    ({"out_dtype": "float33"}, "did you mean 'float32'"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}, "exactly one of 'models' and 'slices'"),
    ({"models": None}, "exactly one of 'models' and 'slices'"),
    ({"models": []}, "exactly one of 'models' and 'slices'"),
    ({"tokenizer_source": "union"}, "'union' (a merged vocabulary) is not supported"),
    ({"tokenizer": {"source": "base", "tokens": {"<x>": {}}}}, "vocabulary surgery"),
    ({"tokenizer": {"source": "base"}, "tokenizer_source": "base"}, "not both"),
    ({"modules": {"text": {}}}, "modules: multi-module configs are not supported"),
    ({"models": [{"model": "a+b+c", "parameters": {"weight": 1}}]}, "more than one '+'"),
    ({"models": "a"}, "models: Input should be a valid list"),
])
def test_structural_errors(changes, want):
    assert want in error(with_(**changes))


def test_slice_errors():
    def sl(*sources):
        return {"merge_method": "passthrough", "slices": [{"sources": list(sources)}]}

    assert "same number of layers" in error(sl({"model": "a", "layer_range": [0, 2]},
                                               {"model": "b", "layer_range": [0, 3]}))
    assert "slices[0].sources[0].layer_range: expected [start, end)" in error(sl({"model": "a",
                                                                                 "layer_range": [2, 2]}))
    assert "slices[0].sources: a slice needs at least one source" in error(sl())


def test_file_errors(tmp_path):
    assert error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [ties\n")
    assert error(bad).startswith(f"{bad}: invalid YAML:")
    bad.write_text("- a\n- b\n")
    assert "expected a mapping" in error(bad)
    bad.write_text("merge_method: ties\nbase_model: x\nmodels:\n  - model: y\n    parameters: {wieght: 1}\n")
    assert error(bad).startswith(f"{bad}: models[0].parameters.wieght: unknown parameter")
