"""The engine and the adapter pool without HTTP: exact token parity, mixed batches, eviction, names, embeddings."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaForCausalLM

import splice
from splice.errors import SpliceError
from splice.serve import AdapterPool, Engine, SamplingParams
from splice.serve.pool import AdapterLoadError, PoolFull, UnknownAdapter

from .conftest import ADAPTERS, PROMPTS, word_tokenizer

TOK = word_tokenizer()


def engine_for(base_dir, adapters_dir, **kw) -> Engine:
    model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    return Engine(model, AdapterPool(model, adapters_dir, max_bytes=kw.pop("max_bytes", 1 << 30)), **kw)


@pytest.mark.parametrize("mixed", [True, False])
def test_mixed_batch_generation_equals_each_adapter_alone(served, references, mixed):
    base, adapters = served
    jobs = [(name, p) for p in PROMPTS for name in (None, *ADAPTERS)]  # interleaved: rows must be re-sorted
    with engine_for(base, adapters, max_batch=6, mixed=mixed) as engine:
        out = engine.generate([TOK(p).input_ids for _, p in jobs], [n for n, _ in jobs],
                              SamplingParams(max_tokens=8, stop_token_ids=(2,)))
        stats = engine.stats
    assert out == [references[job] for job in jobs]  # the same token ids, EOS included where the reference has it
    if mixed:  # several adapters shared decoding steps, and new rows joined a running batch
        assert stats.max_adapters >= 3 and stats.prefills >= 2
    else:
        assert stats.max_adapters == 1


def test_sampling_is_reproducible_with_a_seed(served):
    base, adapters = served
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    with engine_for(base, adapters) as engine:
        a = engine.generate([TOK(PROMPTS[0]).input_ids] * 2, ["alpha", "beta"], params)
        b = engine.generate([TOK(PROMPTS[0]).input_ids] * 2, ["alpha", "beta"], params)
    assert a == b and len(a[0]) == 8


def test_a_tiny_temperature_samples_the_argmax_and_fails_no_row(served, references):
    # logits / 1e-45 overflow to inf and softmax to NaN unless the max is subtracted first; the failure took the
    # whole batch (here a greedy row beside it) down with it.
    base, adapters = served
    ids = TOK(PROMPTS[0]).input_ids
    with engine_for(base, adapters) as engine:
        greedy = engine.generate([ids], ["alpha"], SamplingParams(max_tokens=8, stop_token_ids=(2,)))
        both = engine.generate([ids, ids], ["alpha", "beta"], SamplingParams(max_tokens=8, temperature=1e-45,
                                                                             stop_token_ids=(2,)))
    assert greedy == [references[("alpha", PROMPTS[0])]]
    assert both == [references[("alpha", PROMPTS[0])], references[("beta", PROMPTS[0])]]


def test_a_refused_request_gives_its_adapter_hold_back(served):
    base, adapters = served
    with pytest.raises(SpliceError, match="max_batch"):
        engine_for(base, adapters, max_batch=0)  # would admit nothing and spin forever
    engine = engine_for(base, adapters)
    with engine:
        with pytest.raises(SpliceError, match="seed 18446744073709551616"):
            engine.generate([[5, 6]], ["alpha"], SamplingParams(temperature=1.0, seed=2**64))
        assert engine.pool.unload("alpha")  # nobody holds it: removed at once, not deferred
    with pytest.raises(SpliceError, match="engine is stopped"):  # it would wait forever for a worker
        engine.generate([[5, 6]], ["alpha"])
    assert engine.pool.unload("alpha")


def test_pool_evicts_least_recently_used_within_its_bytes(served):
    base, adapters = served
    model = LlamaForCausalLM.from_pretrained(base).eval()
    pool = AdapterPool(model, adapters, max_bytes=1 << 30)
    sizes = {}
    for name in ADAPTERS:
        pool.load(name)
        sizes[name] = pool.resident()[name]
    assert sizes["alpha"] < sizes["beta"] < sizes["gamma"]  # ranks 2, 4, 6
    for name in ADAPTERS:
        pool.unload(name)
    assert splice.AdaptedModel(model).adapters == [] and pool.nbytes == 0

    pool.max_bytes = sizes["beta"] + sizes["gamma"]
    pool.load("alpha"), pool.load("beta"), pool.load("alpha")  # alpha is now the most recently used
    pool.load("gamma")  # over budget: beta (least recently used) goes, alpha stays
    assert list(pool.resident()) == ["alpha", "gamma"] and pool.evictions == 1
    assert sorted(splice.AdaptedModel(model).adapters) == ["alpha", "gamma"]

    pool.acquire("alpha"), pool.acquire("gamma")  # held by requests: neither may be evicted
    with pytest.raises(PoolFull, match="does not fit"):
        pool.acquire("beta")
    assert list(pool.resident()) == ["alpha", "gamma"]
    assert pool.unload("gamma") is False  # deferred while held...
    assert "gamma" in pool.resident()
    pool.acquire("gamma")  # a new request does not cancel the pending unload (it used to)
    pool.release("gamma")
    pool.release("gamma")  # ...and gone when the last holder is done
    assert list(pool.resident()) == ["alpha"]

    pool.release("alpha")
    pool.load("beta")  # alpha (idle) and beta resident; an adapter that can never fit must not evict them
    pool.max_bytes = sizes["gamma"] - 1
    with pytest.raises(PoolFull, match="'gamma'.*does not fit"):
        pool.acquire("gamma")
    assert sorted(pool.resident()) == ["alpha", "beta"]


def test_pool_lists_only_named_adapters_once_its_folder_is_gone(served, tmp_path):
    import shutil

    base, adapters = served
    copy = tmp_path / "adapters"
    shutil.copytree(adapters / "alpha", copy / "alpha")
    pool = AdapterPool(LlamaForCausalLM.from_pretrained(base).eval(), copy, paths={"beta": adapters / "beta"})
    assert pool.available() == ["alpha", "beta"]
    shutil.rmtree(copy)  # removed (or a symlink swapped) after startup: a FileNotFoundError traceback before
    assert pool.available() == ["beta"]
    with pytest.raises(UnknownAdapter, match="no adapter named 'alpha'"):
        pool.acquire("alpha")


def test_pool_names_cannot_leave_the_folder(served, tmp_path):
    base, adapters = served
    model = LlamaForCausalLM.from_pretrained(base).eval()
    pool = AdapterPool(model, adapters)
    for bad in ["../base", "..", ".", "a/b", "a\\b", "/etc/passwd", "", "x" * 200, "name.with.dots", "-lead"]:
        with pytest.raises(SpliceError, match="not valid"):
            pool.acquire(bad)
    with pytest.raises(UnknownAdapter, match="no adapter named 'alpah'.*did you mean 'alpha'"):
        pool.acquire("alpah")
    outside = tmp_path / "outside"
    os.symlink(adapters / "alpha", outside)
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    os.symlink(outside, link_dir / "sneaky")  # a link in the folder pointing out of it is refused too
    with pytest.raises(UnknownAdapter):
        AdapterPool(model, link_dir).acquire("sneaky")
    with pytest.raises(AdapterLoadError, match="broken.*adapter_model.safetensors"):
        pool.acquire("broken")
    assert pool.resident() == {} and splice.AdaptedModel(model).adapters == []
    assert pool.available() == sorted([*ADAPTERS, "broken"])


def test_embeddings_of_mixed_adapters_equal_each_adapter_alone(tmp_path):
    def bert():
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, attn_implementation="eager")).eval()

    for i, name in enumerate(["one", "two"]):
        m = bert()
        splice.adapt(m, splice.LoraConfig(r=4, target_modules=["query", "value"]))
        with torch.no_grad():
            for p in splice.trainable_parameters(m):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
        splice.save_adapter(m, tmp_path / name)
    texts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    model = bert()
    with Engine(model, AdapterPool(model, tmp_path), "encoder") as engine:
        got = engine.generate(texts * 3, [None] * 3 + ["one"] * 3 + ["two"] * 3)
    for k, name in enumerate([None, "one", "two"]):
        ref = bert() if name is None else splice.load_adapter(bert(), tmp_path / name)
        for j, ids in enumerate(texts):
            with torch.no_grad():
                hidden = ref(input_ids=torch.tensor([ids])).last_hidden_state
            want = torch.nn.functional.normalize(hidden.mean(1), dim=-1)
            assert torch.allclose(torch.tensor(got[3 * k + j]), want[0], atol=1e-5), (name, ids)
    assert not torch.allclose(torch.tensor(got[0]), torch.tensor(got[3]), atol=1e-3)


def test_a_failing_request_fails_alone_and_the_engine_keeps_serving(served, references):
    base, adapters = served
    with engine_for(base, adapters) as engine:
        with pytest.raises(SpliceError, match="generation failed: IndexError"):
            engine.generate([[5, 10**6]], ["alpha"], SamplingParams(max_tokens=4))
        assert engine.pool.resident() == {"alpha": engine.pool.resident()["alpha"]}  # released, still resident
        out = engine.generate([TOK(PROMPTS[0]).input_ids], ["alpha"], SamplingParams(max_tokens=8, stop_token_ids=(2,)))
    assert out == [references[("alpha", PROMPTS[0])]]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_other_architectures_batch_exactly(tiny, tmp_path, family):
    build = tiny[family].build
    for i, name in enumerate(["x", "y"]):
        m = build()
        splice.adapt(m, splice.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for p in splice.trainable_parameters(m):
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
        splice.save_adapter(m, tmp_path / name)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    jobs = [(a, p) for a in (None, "x", "y") for p in prompts]
    want = []
    for a, p in jobs:
        ref = build() if a is None else splice.load_adapter(build(), tmp_path / a)
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
        want.append(out[0, len(p):].tolist())
    model = build()
    with Engine(model, AdapterPool(model, tmp_path), max_batch=4) as engine:
        got = engine.generate([p for _, p in jobs], [a for a, _ in jobs], SamplingParams(max_tokens=6))
    assert got == want


def test_the_pool_refuses_a_prompt_adapter_in_one_line(served, tmp_path):
    # Loaded, it became the model's active adapter and every mixed batch (base and LoRA rows too) was refused.
    base, _ = served
    model = splice.adapt(LlamaForCausalLM.from_pretrained(base).eval(),
                         splice.adapters.make_config("prompt_tuning", num_virtual_tokens=2))
    splice.save_adapter(model, tmp_path / "p")
    pool = AdapterPool(LlamaForCausalLM.from_pretrained(base).eval(), tmp_path)
    with pytest.raises(AdapterLoadError, match="'p' is a prompt adapter"):
        pool.acquire("p")
    assert pool.resident() == {}


def test_sampling_follows_its_parameters(served, references):
    # A server that always decoded greedily passed the seed test alone.
    base, adapters = served
    ids = [TOK(PROMPTS[0]).input_ids]
    with engine_for(base, adapters) as engine:
        runs = {s: engine.generate(ids, ["alpha"], SamplingParams(max_tokens=8, temperature=2.0, seed=s))[0]
                for s in range(6)}
        nucleus = engine.generate(ids, ["alpha"], SamplingParams(max_tokens=8, temperature=2.0, top_p=1e-6, seed=1,
                                                                 stop_token_ids=(2,)))
    assert len({tuple(v) for v in runs.values()}) > 1  # other seeds, other tokens at a high temperature
    assert nucleus == [references[("alpha", PROMPTS[0])]]  # top_p that keeps one token is greedy
