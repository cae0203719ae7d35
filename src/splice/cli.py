"""The `splice` command. Each subcommand is a thin shell over a library function; bad input exits with one line."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from splice.errors import SpliceError, closest

app = typer.Typer(
    help="splice: adapt, compress, merge and serve fine-tunes. Every fine-tune is a delta on a base.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ADAPTER_FLAGS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "rslora": "use_rslora",
                 "init": "init_lora_weights", "bias": "bias", "num_virtual_tokens": "num_virtual_tokens"}
TRAIN_FLAGS = ("epochs", "lr", "batch_size", "max_length", "max_steps", "seed", "weight_decay", "warmup_ratio",
               "strategy")
YAML_KEYS = ("method", "task", "adapter", "train")


def _load_yaml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    from splice.io.checkpoints import parse_yaml, read_text

    data = parse_yaml(read_text(path, "config file"), path) or {}
    if not isinstance(data, dict):
        raise SpliceError(f"{path}: expected a mapping with keys {', '.join(YAML_KEYS)}")
    for key in data:
        if key not in YAML_KEYS:
            raise SpliceError(f"{path}: unknown key {key!r}{closest(key, YAML_KEYS)}; valid: {', '.join(YAML_KEYS)}")
    for key, value in data.items():
        want = dict if key in ("adapter", "train") else str
        if value is not None and not isinstance(value, want):
            raise SpliceError(f"{path}: {key}: expected {'a mapping' if want is dict else 'a name'}, got "
                              f"{type(value).__name__} {value!r}")
    return data


def _targets(value: str) -> list[str] | str:
    """'query,value' → a list of suffixes; 'all-linear' or a regex (has regex characters) stays a string."""
    if value == "all-linear" or any(c in value for c in "*[]()|^$+?\\"):
        return value
    return [v.strip() for v in value.split(",") if v.strip()]


def _options(items: list[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE items → a dict; values read as YAML scalars (8 → int, 0.5 → float, true → bool)."""
    from splice.io.checkpoints import parse_yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpliceError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} rank=8")
        out[key.strip()] = parse_yaml(value, flag) if value.strip() else value
    return out


def _train_section(section: dict[str, Any]) -> dict[str, Any]:
    """The YAML `train:` section; a strategy's options may sit under its own name (`galore: {rank: 8}`)."""
    fields = dict(section)
    name = fields.get("strategy")
    if isinstance(name, str) and isinstance(fields.get(name), dict):
        fields["strategy_options"] = {**fields.pop(name), **(fields.get("strategy_options") or {})}
    return fields


@app.command(epilog="Examples:  splice train default reviews.csv --out my-adapter --method lora --r 8 "
                    "--target-modules query,value --epochs 3\n\n"
                    "splice train default reviews.csv --out my-model --method full --strategy galore "
                    "--strategy-option rank=8 --lr 3e-5   (memory-efficient full fine-tuning; YAML: train: "
                    "{strategy: galore, galore: {rank: 8}}; the strategies and their options: splice strategies)")
def train(
    model: str = typer.Argument(..., help="Base model: 'default' (embedded all-MiniLM-L6-v2), a local folder, "
                                          "or a hub id."),
    data: Path = typer.Argument(..., help="CSV or JSONL: text+label columns (classification) or text / "
                                          "prompt+completion (causal LM)."),
    out: Path = typer.Option(..., "--out", "-o", help="Adapter folder to write (PEFT format)."),
    task: Optional[str] = typer.Option(None, help="classification, causal-lm, or auto, the default (classification "
                                                  "when the data has a label column)."),
    method: Optional[str] = typer.Option(None, help="Adapter method (default lora; see `splice methods`), or full: "
                                                    "fine-tune every weight and save the whole model."),
    r: Optional[int] = typer.Option(None, help="Rank."),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha (scaling numerator)."),
    dropout: Optional[float] = typer.Option(None, help="Dropout on the adapter branch."),
    rslora: Optional[bool] = typer.Option(None, "--rslora/--no-rslora", help="Scale by alpha/sqrt(r)."),
    init: Optional[str] = typer.Option(None, help="kaiming, gaussian, pissa, olora, or (computed from the first "
                                                  "training batches) eva, lora_ga, corda."),
    bias: Optional[str] = typer.Option(None, help="none, lora_only or all."),
    num_virtual_tokens: Optional[int] = typer.Option(None, help="Virtual tokens (prompt_tuning, prefix_tuning, "
                                                               "p_tuning)."),
    target_modules: Optional[str] = typer.Option(None, help="Comma-separated suffixes, a regex, or all-linear."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with method/task/adapter/train "
                                                                       "keys; flags override it."),
    epochs: Optional[float] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None), max_length: Optional[int] = typer.Option(None),
    max_steps: Optional[int] = typer.Option(None), seed: Optional[int] = typer.Option(None),
    weight_decay: Optional[float] = typer.Option(None), warmup_ratio: Optional[float] = typer.Option(None),
    strategy: Optional[str] = typer.Option(None, help="Memory-efficient training strategy: galore, lisa, hft (with "
                                                      "--method full) or relora (with --method lora); see "
                                                      "`splice strategies`."),
    strategy_option: list[str] = typer.Option([], "--strategy-option", help="KEY=VALUE: one option of the "
                                                                            "strategy (repeatable), e.g. rank=8."),
    eval_file: Optional[Path] = typer.Option(None, help="Held-out data (default: 10% of DATA)."),
    text_field: str = typer.Option("text"), label_field: str = typer.Option("label"),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train an adapter on a dataset file and save it as a PEFT folder; evaluates at the end."""
    from splice.adapters.config import config_from_dict
    from splice.adapters.registry import make_config
    from splice.train import data as D
    from splice.train.loop import TrainConfig
    from splice.train.run import train_causal_lm, train_classifier

    from splice.train.run import FULL

    cfg = _load_yaml(config)
    flags = locals()
    adapter_fields = dict(cfg.get("adapter") or {})
    method = method or cfg.get("method") or "lora"
    adapter_fields.update(_own_names(method, {field: flags[f] for f, field in ADAPTER_FLAGS.items()
                                              if flags[f] is not None}) if method != FULL else {})
    if target_modules is not None:
        adapter_fields["target_modules"] = _targets(target_modules)
    if method == FULL:  # every weight trains: no adapter, so no adapter options
        given = sorted(adapter_fields) + [f"--{f.replace('_', '-')}" for f in ADAPTER_FLAGS if flags[f] is not None]
        if given:
            raise SpliceError(f"--method full trains every weight; adapter options do not apply: {', '.join(given)}")
    adapter = None if method == FULL else make_config(method, **adapter_fields)
    train_fields = _train_section(cfg.get("train") or {})
    train_fields.update({f: flags[f] for f in TRAIN_FLAGS if flags[f] is not None})
    if strategy_option:
        train_fields["strategy_options"] = {**(train_fields.get("strategy_options") or {}),
                                            **_options(strategy_option, "--strategy-option")}
    tconf = config_from_dict(TrainConfig, train_fields, "train")
    if tconf.strategy == "relora" and method != "lora":  # checked before the model loads and the probe runs
        raise SpliceError(f"--strategy relora merges and restarts a LoRA adapter; it needs --method lora, not {method}")
    if out.exists() and not force:
        raise SpliceError(f"{out}: output folder exists; pass --force to replace it")
    kind = task or cfg.get("task") or "auto"  # the flag overrides the YAML, as every other flag does
    if kind == "auto":
        kind = "classification" if D.has_field(data, label_field) else "causal-lm"
    if kind == "classification":
        ds = D.load_classification_file(data, text_field, label_field)
        evaluation = (D.load_classification_file(eval_file, text_field, label_field, label_names=ds.label_names)
                      if eval_file else None)
        if evaluation is None:
            ds, evaluation = D.split_train_eval(ds, 0.1, tconf.seed)
        train_classifier(model, ds, evaluation, adapter, tconf, out, force=force, progress=progress)
    elif kind == "causal-lm":
        pairs = D.load_lm_file(data, text_field)
        evaluation = D.load_lm_file(eval_file, text_field) if eval_file else None
        if evaluation is None:
            pairs, evaluation = D.split_train_eval(pairs, 0.1, tconf.seed)
        train_causal_lm(model, pairs, evaluation, adapter, tconf, out, force=force, progress=progress)
    else:
        raise SpliceError(f"--task: {kind!r} is not one of auto, classification, causal-lm")


@app.command(epilog="Example:  splice strategies")
def strategies() -> None:
    """List the memory-efficient training strategies (`splice train --strategy NAME`) and their options."""
    from splice.adapters.config import field_help
    from splice.train.optim.registry import get_strategy, strategy_names

    for name in strategy_names():
        s = get_strategy(name)
        on = "--method full" if s.pairs_with == "full" else "a LoRA adapter (--method lora)"
        typer.echo(f"{name}  ({s.reference}; trains on top of {on})")
        for field, text in field_help(s.config).items():
            typer.echo(f"    {field}: {text}")


def _own_names(method: str, fields: dict[str, Any]) -> dict[str, Any]:
    """--alpha, --dropout and --init name LoRA's fields; a method without them gets its own (LoHa's alpha, VeRA's
    dropout, LoRA-SB's init_weights)."""
    import dataclasses

    from splice.adapters.registry import get_method

    own = {f.name for f in dataclasses.fields(get_method(method).config)}
    for lora, other in (("lora_alpha", "alpha"), ("lora_dropout", "vera_dropout"),
                        ("init_lora_weights", "init_weights")):
        if lora in fields and lora not in own and other in own:
            fields[other] = fields.pop(lora)
    return fields


@app.command(epilog="Example:  splice apply default my-adapter merged-model  (then: AutoModel.from_pretrained"
                    "('merged-model'))")
def apply(
    base: str = typer.Argument(..., help="Base model: 'default', a local folder, or a hub id."),
    adapter: Path = typer.Argument(..., help="Adapter folder (PEFT or splice)."),
    out: Path = typer.Argument(..., help="Output model folder."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (atomically)."),
    dtype: Optional[str] = typer.Option(None, help="Write weights as float32, float16 or bfloat16 "
                                                   "(default: the base's dtype)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Merge an adapter into its base and write a complete HF model folder (config, tokenizer, safetensors)."""
    import torch

    from splice.apply import apply_adapter

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype is not None and dtype not in dtypes:
        raise SpliceError(f"--dtype: {dtype!r} is not one of {', '.join(dtypes)}{closest(dtype, dtypes)}")
    path = apply_adapter(base, adapter, out, force=force, dtype=dtypes.get(dtype or ""), progress=progress)
    typer.echo(f"wrote {path}")


@app.command(epilog="Example:  splice merge ties.yaml merged-model --dry-run   (then without --dry-run)\n\n"
                    "ties.yaml:  merge_method: ties / base_model: ./base / models: [{model: ./ft-a, parameters: "
                    "{weight: 0.5, density: 0.5}}, {model: ./ft-b, parameters: {weight: [0.2, 0.8]}}] / "
                    "dtype: bfloat16")
def merge(
    config: Path = typer.Argument(..., help="Merge config: mergekit's YAML (merge_method, base_model, models or "
                                            "slices, parameters, dtype)."),
    out: Path = typer.Argument(..., help="Output folder: an HF model (or a PEFT adapter with --out-format lora)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (atomically)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the config and every input's tensors, print the "
                                                          "plan, write nothing."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="Write a LoRA (implies --out-format lora) "
                                                                      "whose modules' merged updates are truncated "
                                                                      "to this rank (SVD)."),
    out_format: Optional[str] = typer.Option(None, "--out-format", help="model (the default), or lora when every "
                                                                        "input is a LoRA adapter of base_model."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Data file (CSV/JSONL) or saved "
                                                                           "calibration folder, for methods that "
                                                                           "need Fisher / Gram statistics."),
    seed: int = typer.Option(0, "--seed", help="Seed of random methods (DARE, DELLA); per tensor, reproducible."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Tensors merged at once, one core each (default: "
                                                                  "torch's thread count, at most 4); the output "
                                                                  "does not depend on it."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Merge fine-tunes of one base from a mergekit-style YAML, streaming tensor by tensor."""
    from splice.merge import merge as run_merge

    out_format = out_format or ("lora" if lora_rank is not None else "model")  # as splice.merge(lora_rank=...)
    if out_format not in ("model", "lora"):
        raise SpliceError(f"--out-format: {out_format!r} is not one of model, lora"
                          f"{closest(out_format, ['model', 'lora'])}")
    if lora_rank is not None and out_format != "lora":
        raise SpliceError("--lora-rank writes a LoRA; it cannot go with --out-format model")
    result = run_merge(config, out, force=force, dry_run=dry_run, progress=progress, calibration=calibration,
                       seed=seed, out_format=out_format, lora_rank=lora_rank, workers=workers)
    typer.echo(str(result) if dry_run else f"wrote {result}")


@app.command(epilog="Example:  splice inspect my-adapter")
def inspect(path: Path = typer.Argument(..., help="An adapter folder, a model folder or a safetensors file."),
            json_out: bool = typer.Option(False, "--json", help="Print JSON instead of aligned text.")) -> None:
    """Show what an adapter or model holds: method, rank, targets, parameters, bytes."""
    import json

    from splice.inspect import format_inspect, inspect_path

    info = inspect_path(path)
    typer.echo(json.dumps(info, indent=2) if json_out else format_inspect(info))


@app.command(epilog="Example:  splice quickstart --out splice-quickstart")
def quickstart(out: Path = typer.Option(Path("splice-quickstart"), help="Folder for the demo's output: the adapter "
                                                                      "goes to OUT/adapter, replaced on each run."),
               epochs: float = typer.Option(3.0, help="Training epochs over 2,000 examples."),
               progress: bool = typer.Option(True, "--progress/--no-progress")) -> None:
    """Probe, LoRA-train, save, reload and re-score all-MiniLM-L6-v2 on Rotten Tomatoes (no hub needed)."""
    from splice.quickstart import quickstart as run

    run(out, epochs=epochs, progress=progress)


@app.command(epilog="Example:  splice methods")
def methods() -> None:
    """List the registered adapter methods and their config fields."""
    from splice.adapters.config import field_help
    from splice.adapters.registry import get_method, method_names

    for name in method_names():
        m = get_method(name)
        typer.echo(f"{name}  ({m.reference})")
        for field, text in field_help(m.config).items():
            typer.echo(f"    {field}: {text}")


@app.command(epilog="Example:  splice serve ./base-model --adapters ./adapters --port 8000 --api-key $KEY  "
                    "(then: curl localhost:8000/v1/completions -H \"Authorization: Bearer $KEY\" "
                    "-H \"Content-Type: application/json\" -d '{\"model\": \"my-adapter\", \"prompt\": \"Hi\"}')")
def serve(
    base: str = typer.Argument(..., help="Base model: a local folder, a hub id, or 'default'."),
    adapters: Optional[Path] = typer.Option(None, "--adapters", help="Folder with one adapter folder per name; "
                                                                     "a request's `model` names the adapter."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=PATH: one more adapter anywhere (repeatable)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, envvar="SPLICE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (or set SPLICE_API_KEY)."),
    kind: str = typer.Option("auto", help="causal-lm, encoder, or auto (from the model's config)."),
    name: Optional[str] = typer.Option(None, help="The base model's id in the API (default: its folder name)."),
    max_batch: int = typer.Option(32, help="Most sequences decoded together."),
    adapter_memory_mb: float = typer.Option(1024, help="Memory for loaded adapters; least recently used ones "
                                                       "are unloaded beyond it."),
    max_tokens: int = typer.Option(512, help="Most tokens generated per prompt."),
    max_prompt_tokens: int = typer.Option(2048, help="Longest prompt accepted, in tokens."),
    max_request_kb: int = typer.Option(1024, help="Largest request body accepted."),
) -> None:
    """Serve a base model and its adapters behind an OpenAI-compatible API (completions, chat, embeddings)."""
    import uvicorn

    from splice.serve import ServeLimits, build_app

    for flag, value in (("--max-batch", max_batch), ("--max-tokens", max_tokens),
                        ("--max-prompt-tokens", max_prompt_tokens), ("--max-request-kb", max_request_kb),
                        ("--adapter-memory-mb", adapter_memory_mb)):
        if value <= 0:  # checked before the model loads (0 would admit nothing, and every request would hang)
            raise SpliceError(f"{flag} must be positive, not {value}")
    paths = {}
    for item in adapter:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SpliceError(f"--adapter {item!r}: expected NAME=PATH")
        paths[key] = value
    limits = ServeLimits(max_request_bytes=max_request_kb * 1024, max_prompt_tokens=max_prompt_tokens,
                         max_tokens=max_tokens)
    app_ = build_app(base, adapters, adapter_paths=paths, kind=kind, model_name=name, api_key=api_key,
                     max_adapter_bytes=int(adapter_memory_mb * 2**20), max_batch=max_batch, limits=limits)
    uvicorn.run(app_, host=host, port=port, log_level="info")

@app.command(epilog="Examples:  splice compress my-adapter small --method dare,quantize --density 0.1 --bits 4\n\n"
                    "splice compress my-finetune small --base default --method svd,quantize --rank 32 --bits 4")
def compress(
    src: Path = typer.Argument(..., metavar="IN", help="Adapter folder, compressed-delta folder, or a full "
                                                       "fine-tuned model folder (with --base)."),
    out: Path = typer.Argument(..., help="Output compressed-delta folder (delta_config.json + delta.safetensors)."),
    method: str = typer.Option(..., "--method", "-m", help="Comma-separated chain: magnitude, dare, darex, compeft, "
                                                           "quantize, svd, delta_come (order: svd → sparsify → "
                                                           "quantize)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model ('default', folder, hub id): needed for a "
                                                            "full model; checks an adapter against it."),
    density: Optional[float] = typer.Option(None, help="Fraction of entries kept (magnitude, dare, darex, "
                                                       "compeft)."),
    bits: Optional[int] = typer.Option(None, help="Bits per value for quantize: 8, 4, 2, 1 (sign + scale)."),
    group_size: Optional[int] = typer.Option(None, help="Values per quantization scale; 0 = one per tensor."),
    rank: Optional[int] = typer.Option(None, help="Rank for svd / delta_come."),
    energy: Optional[float] = typer.Option(None, help="Or choose the rank per tensor: share of ||dW||^2 kept."),
    q: Optional[float] = typer.Option(None, help="darex: fixed rescaling 1/q, q in [density, 1]."),
    q_mode: Optional[str] = typer.Option(None, help="darex: output, norm or dare."),
    alpha: Optional[str] = typer.Option(None, help="compeft: 'mean' or c for scale c*std."),
    block_bits: Optional[str] = typer.Option(None, help="delta_come: bits per singular-vector block, e.g. 8,4,2."),
    block_ranks: Optional[str] = typer.Option(None, help="delta_come: vectors per block but the last, e.g. 2,30."),
    seed: int = typer.Option(0, help="Seed of the random methods (per tensor, reproducible)."),
    rows: Optional[int] = typer.Option(None, help="Print only the N tensors with the largest error."),
    eval_file: Optional[Path] = typer.Option(None, "--eval", "--eval-file",
                                             help="Labelled CSV/JSONL: print the classifier's accuracy before and "
                                                  "after (needs --base and the head saved in IN)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (atomically)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Compress a fine-tune's delta; prints bytes before/after, the ratio and each tensor's relative error."""
    from splice.compress import compress as run_compress, open_deltas, save_compressed

    flags = locals()
    params = {k: flags[k] for k in ("density", "bits", "group_size", "rank", "energy", "q", "q_mode", "alpha",
                                    "block_bits", "block_ranks") if flags[k] is not None}
    if out.exists() and not force:
        raise SpliceError(f"{out}: output folder exists; pass --force to replace it")
    if eval_file is not None and base is None:
        raise SpliceError("--eval needs --base (the model the classifier's encoder starts from)")
    deltas = open_deltas(src, base)
    small, report = run_compress(deltas, method, seed=seed, progress=progress, **params)
    accuracies = None
    if eval_file is not None:  # before writing: a bad --eval file must leave no output behind
        from splice.compress.evaluate import accuracy_with

        accuracies = [accuracy_with(base, d, src, eval_file) for d in (open_deltas(src, base), small)]
    path = save_compressed(small, out, force=force, side_files_from=src if src.is_dir() else None)
    typer.echo(report.format(rows))
    if accuracies is not None:
        typer.echo(f"accuracy on {eval_file}: {accuracies[0]:.4f} before, {accuracies[1]:.4f} after "
                   f"({100 * (accuracies[1] - accuracies[0]):+.1f} points)")
    typer.echo(f"wrote {path}")


@app.command(epilog="Example:  splice extract default my-full-finetune my-lora --rank 16")
def extract(
    base: str = typer.Argument(..., help="Base model: 'default', a local folder, or a hub id."),
    finetuned: Path = typer.Argument(..., help="The full fine-tuned model folder."),
    out: Path = typer.Argument(..., help="Output LoRA adapter folder (PEFT format)."),
    rank: Optional[int] = typer.Option(None, help="LoRA rank of every weight matrix."),
    energy: Optional[float] = typer.Option(None, help="Or per tensor: the fewest singular values holding this "
                                                     "share of ||dW||^2 (e.g. 0.9)."),
    extras: bool = typer.Option(True, "--extras/--no-extras", help="Also keep changed biases and norms (full "
                                                                   "precision)."),
    rows: Optional[int] = typer.Option(None, help="Print only the N tensors with the largest error."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (atomically)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Turn a full fine-tune into a LoRA adapter (truncated SVD of each weight's delta), streaming."""
    from splice.compress import extract as run_extract

    if out.exists() and not force:
        raise SpliceError(f"{out}: output folder exists; pass --force to replace it")
    report = run_extract(base, finetuned, out, rank=rank, energy=energy, extras=extras, force=force,
                         progress=progress)
    typer.echo(report.format(rows))
    typer.echo(f"wrote {out}")


bench_app = typer.Typer(help="Benchmarks on real models and data (fetched at run time into a cache folder).",
                        epilog="Example:  splice bench quality --profile smoke", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("quality", epilog="Example:  splice bench quality --profile smoke   (full: --profile full "
                                     "--max-minutes 9, repeated until the report says every cell finished)")
def bench_quality(
    profile: str = typer.Option("smoke", help="smoke (3 tasks, a few hundred examples, 1 epoch) or full "
                                              "(8 tasks, 2,000 / 1,000 examples, 3 epochs)."),
    cache: Optional[Path] = typer.Option(None, help="Data, fine-tunes and finished cells (default "
                                                    "$SPLICE_BENCH_CACHE or ~/.cache/splice/bench)."),
    cells: Optional[Path] = typer.Option(None, help="Keep finished cells, the run log and task heads here "
                                                    "(small files to commit, so a long profile resumes on another "
                                                    "machine) instead of in the cache."),
    out: Path = typer.Option(Path("bench/results"), help="Folder for the markdown report and PNG plots."),
    max_minutes: Optional[float] = typer.Option(None, help="Start no new cell after this many minutes; "
                                                           "a re-run resumes from the cache."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's)."),
    mergekit: bool = typer.Option(True, "--mergekit/--no-mergekit", help="Also score mergekit's merge of the "
                                                                        "same deltas where it has the method."),
    report_only: bool = typer.Option(False, "--report-only", help="Compute nothing: write the report from the "
                                                                  "cells finished so far."),
    shard: str = typer.Option("0/1", help="I/N: train every N-th adapter cell from the I-th, so N processes (one "
                                            "per core, e.g. --threads 1) fill one cache side by side."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Adapters and merges on all-MiniLM-L6-v2 and real tasks: accuracy tables, plots, the reproduce command."""
    from splice.bench.quality import get_profile

    get_profile(profile)  # a typo fails before the heavy imports
    try:
        shard_i, shard_n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise SpliceError(f"--shard: expected I/N such as 0/2, got {shard!r}") from None
    if not 0 <= shard_i < shard_n:
        raise SpliceError(f"--shard: expected I/N with 0 <= I < N, got {shard!r}")
    if threads is not None and threads < 1:
        raise SpliceError(f"--threads: must be at least 1, got {threads}")
    if max_minutes is not None and max_minutes <= 0:
        raise SpliceError(f"--max-minutes: must be positive, got {max_minutes}")
    import torch

    from splice.bench.quality import run as run_quality

    if threads is not None:
        torch.set_num_threads(threads)
    command = " ".join(["splice bench quality", f"--profile {profile}"] +
                       ([f"--threads {threads}"] if threads is not None else []) +
                       ([f"--cells {cells}"] if cells is not None else []) +
                       ([] if mergekit else ["--no-mergekit"]))
    run_quality(profile, cache=cache, cells=cells, out=out, max_minutes=max_minutes, progress=progress,
                mergekit=mergekit, command=command, report_only=report_only,
                log=lambda line: typer.echo(line, err=True), shard=(shard_i, shard_n))


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv`; returns the exit code. Bad input becomes one `error: ...` line, never a traceback."""
    try:
        app(args=argv, prog_name="splice")  # standalone mode: usage errors are printed and exit by themselves
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except SpliceError as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except OSError as err:  # disk full, permissions...: still one line naming the path
        typer.echo(f"error: {err}", err=True)
        return 1
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
