"""`splice serve` on loopback, driven by the official `openai` client: parity with the library, mixed batches,
adapter loading/unloading under load, and the safety cases."""
from __future__ import annotations

import concurrent.futures as cf
import shutil
import threading
import time

import httpx2 as httpx
import openai
import pytest

from splice.serve import ServeLimits, ServerThread, build_app

from .conftest import ADAPTERS, CHAT_TEMPLATE, PROMPTS, word_tokenizer

TOK = word_tokenizer()
KEY = "test-key"


def text_of(tokens: list[int]) -> str:
    # The server stops at EOS without returning it, and skips special tokens in text, like the reference here.
    if 2 in tokens:
        tokens = tokens[: tokens.index(2)]
    return TOK.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def server(served):
    base, adapters = served
    app = build_app(str(base), adapters, model_name="tiny", api_key=KEY, max_batch=8,
                    limits=ServeLimits(max_request_bytes=4096, max_prompt_tokens=64, max_tokens=32, max_prompts=8))
    with ServerThread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def complete(client, model: str, prompt: str, n: int = 8) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
    return out.choices[0].text


def test_each_adapter_alone_equals_the_library(client, references):
    for name in (None, *ADAPTERS):
        for p in PROMPTS:
            assert complete(client, name or "tiny", p) == text_of(references[(name, p)]), (name, p)
    # The adapters really differ, so the check above can tell them apart.
    assert len({text_of(references[(n, PROMPTS[0])]) for n in (None, *ADAPTERS)}) == 4


def test_concurrent_mixed_adapters_equal_single_results(client, server, references):
    jobs = [(name, p) for name in (None, *ADAPTERS) for p in PROMPTS] * 2
    with cf.ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda job: complete(client, job[0] or "tiny", job[1]), jobs))
    assert got == [text_of(references[job]) for job in jobs]
    # They did run together: a decoding step held several adapters' rows at once.
    stats = httpx.get(server + "/admin/adapters", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert set(ADAPTERS) <= set(stats["resident"])
    assert stats["engine"]["max_adapters"] >= 2 and stats["engine"]["max_rows"] >= 4


def test_streaming_chat_and_completion(client, references):
    stream = client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in stream]
    assert "".join(pieces) == text_of(references[("beta", PROMPTS[1])]) and len(pieces) > 1
    chat = client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "w5 w6"}],
                                          max_tokens=6, temperature=0)
    streamed = client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "w5 w6"}],
                                              max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 6


def test_stop_strings_and_n(client, references):
    full = text_of(references[("alpha", PROMPTS[1])]).split()
    stop = full[3]  # the 4th word: the text ends before its first occurrence
    out = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=8, temperature=0, stop=[stop], n=2)
    want = " ".join(full[: full.index(stop)])
    assert [c.text.strip() for c in out.choices] == [want, want]
    assert [c.finish_reason for c in out.choices] == ["stop", "stop"] and [c.index for c in out.choices] == [0, 1]


def test_token_id_prompts_several_prompts_and_echo(client, references):
    ids = TOK(PROMPTS[0]).input_ids
    out = client.completions.create(model="gamma", prompt=ids, max_tokens=8, temperature=0)
    assert out.choices[0].text == text_of(references[("gamma", PROMPTS[0])])
    out = client.completions.create(model="gamma", prompt=PROMPTS[:2], max_tokens=8, temperature=0, echo=True)
    assert [c.text for c in out.choices] == [text_of(TOK(p).input_ids + references[("gamma", p)]) for p in PROMPTS[:2]]
    assert out.usage.prompt_tokens == sum(len(TOK(p).input_ids) for p in PROMPTS[:2])


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "tiny" and set(ADAPTERS) <= set(ids)


def test_load_unload_while_requests_run_loses_nothing(client, server, references):
    admin = httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    jobs = [(name, p) for name in ADAPTERS for p in PROMPTS] * 3
    stop = threading.Event()
    churned = []

    def churn():
        i = 0
        while not stop.is_set():
            name = ADAPTERS[i % len(ADAPTERS)]
            r = admin.post("/admin/adapters/unload", json={"name": name})
            assert r.status_code in (200, 404), r.text  # 404: not resident at that moment
            assert admin.post("/admin/adapters/load", json={"name": name}).status_code == 200
            churned.append(r.json())
            i += 1

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        with cf.ThreadPoolExecutor(8) as ex:
            got = list(ex.map(lambda job: complete(client, job[0], job[1]), jobs))
    finally:
        stop.set()
        churner.join()
    assert got == [text_of(references[job]) for job in jobs]
    assert len(churned) > 3


def test_bad_input_gets_clear_errors_and_the_server_keeps_serving(client, server, references):
    with pytest.raises(openai.NotFoundError, match="no adapter named 'nope'"):
        complete(client, "nope", PROMPTS[0])
    with pytest.raises(openai.BadRequestError, match="not valid"):
        complete(client, "../alpha", PROMPTS[0])
    with pytest.raises(openai.BadRequestError, match="not valid"):
        complete(client, "..%2Fbase", PROMPTS[0])
    with pytest.raises(openai.InternalServerError, match="'broken' cannot be loaded.*adapter_model.safetensors"):
        complete(client, "broken", PROMPTS[0])
    with pytest.raises(openai.APIStatusError, match="over the limit") as big:
        complete(client, "alpha", "w5 " * 3000)
    assert big.value.status_code == 413
    chunked = httpx.post(server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                         content=iter([b'{"model": "alpha", "prompt": "', b"w5 " * 2000, b'"}']))  # no Content-Length
    assert chunked.status_code == 413 and "over the limit" in chunked.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="tokens is over the limit of 64"):
        complete(client, "alpha", "w5 " * 100)
    with pytest.raises(openai.BadRequestError, match="max_tokens: 100 is over this server's limit of 32"):
        complete(client, "alpha", PROMPTS[0], n=100)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="alpha", prompt="w5", max_tokens=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="causal LM"):
        client.embeddings.create(model="tiny", input="w5")
    r = httpx.post(server + "/admin/adapters/load", json={"name": "../../etc"},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "not valid" in r.json()["error"]["message"]
    # ...and every other adapter still serves the right tokens.
    for name in ADAPTERS:
        assert complete(client, name, PROMPTS[2]) == text_of(references[(name, PROMPTS[2])])


def test_a_refused_seed_is_a_400_that_keeps_no_adapter_hold(client, server):
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=2, seed=2**64)
    r = httpx.post(server + "/admin/adapters/unload", json={"name": "alpha"},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.json() == {"name": "alpha", "unloaded": True, "deferred": False}


def test_prompts_past_the_context_and_refused_chat_templates_are_400s(served, tmp_path):
    base, adapters = served
    own = tmp_path / "base"
    shutil.copytree(base, own)
    tok = word_tokenizer()
    tok.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be "
                         "the user') }}{% endif %}" + CHAT_TEMPLATE)
    tok.save_pretrained(own)
    app = build_app(str(own), adapters, model_name="tiny", limits=ServeLimits(max_prompt_tokens=1000))
    with ServerThread(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        # 150 tokens on a 128-position model: refused, where max_tokens' default went negative and passed.
        with pytest.raises(openai.BadRequestError, match="150 tokens is over the model's context of 128"):
            c.completions.create(model="alpha", prompt=[5] * 150)
        last = c.completions.create(model="alpha", prompt=[5] * 127, temperature=0)  # room for exactly one
        assert last.usage.completion_tokens == 1 and last.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match="messages: the model's chat template refused them: the "
                                                         "first message must be the user"):
            c.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "w5"}])
        assert c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}], max_tokens=2,
                                         temperature=0).choices[0].message.content is not None


def stats(server) -> dict:
    return httpx.get(server + "/admin/adapters", headers={"Authorization": f"Bearer {KEY}"}).json()["engine"]


def test_a_disconnected_stream_does_not_stall_the_batch(client, server, references):
    cancelled_before = stats(server)["cancelled"]
    with httpx.Client(timeout=60) as raw:
        with raw.stream("POST", server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 32, "temperature": 0,
                              "stream": True}) as r:
            next(r.iter_lines())  # read one event, then hang up
    # The engine drops the row (it would otherwise decode all 32 tokens for nobody) and serves the next request.
    deadline = time.monotonic() + 30
    while stats(server)["cancelled"] == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats(server)["cancelled"] > cancelled_before
    assert complete(client, "beta", PROMPTS[3]) == text_of(references[("beta", PROMPTS[3])])


def test_a_small_adapter_memory_evicts_and_waits_but_loses_nothing(served, references):
    from transformers import LlamaForCausalLM

    from splice.serve import AdapterPool

    base, adapters = served
    probe = AdapterPool(LlamaForCausalLM.from_pretrained(base).eval(), adapters)
    for name in ADAPTERS:
        probe.load(name)
    sizes = probe.resident()
    budget = sizes["beta"] + sizes["gamma"]  # any two adapters fit, never all three
    app = build_app(str(base), adapters, model_name="tiny", max_adapter_bytes=budget, max_batch=8)
    jobs = [(name, p) for p in PROMPTS for name in ADAPTERS] * 2
    with ServerThread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        with cf.ThreadPoolExecutor(12) as ex:
            got = list(ex.map(lambda job: complete(client, job[0], job[1]), jobs))
        info = httpx.get(url + "/admin/adapters").json()
    assert got == [text_of(references[job]) for job in jobs]
    assert info["evictions"] >= 1 and info["bytes"] <= budget and len(info["resident"]) <= 2


def test_a_request_waits_for_adapter_memory_held_by_others_then_gets_503(served, references):
    from splice.io.models import load_model
    from splice.serve import AdapterPool, Engine, create_app

    base, adapters = served
    model, tokenizer = load_model(str(base), "causal-lm")
    probe = AdapterPool(load_model(str(base), "causal-lm")[0], adapters)
    for name in ("alpha", "beta"):
        probe.load(name)
    sizes = probe.resident()
    pool = AdapterPool(model, adapters, max_bytes=sum(sizes.values()) - 1)  # one at a time
    app = create_app(Engine(model, pool, "causal-lm", max_batch=8), tokenizer, model_name="tiny",
                     limits=ServeLimits(max_tokens=32, adapter_wait_s=1.0))
    with ServerThread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        pool.acquire("alpha")  # as a long request would: alpha stays resident and cannot be evicted
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:
            complete(client, "beta", PROMPTS[0])
        waited = time.monotonic() - t0
        assert info.value.status_code == 503 and "does not fit" in info.value.message
        assert waited >= 1.0  # it waited for room (adapter_wait_s) before giving up
        # Room made while a request waits is taken: the request succeeds, late, instead of failing.
        threading.Timer(0.3, pool.release, ["alpha"]).start()
        assert complete(client, "beta", PROMPTS[0]) == text_of(references[("beta", PROMPTS[0])])
        assert "alpha" not in httpx.get(url + "/admin/adapters").json()["resident"]  # evicted for beta
