"""The quality benchmark's smoke profile end to end on the real model and real data (read from the PyPI packages
that `.[test]` installs): every adapter arm trains on the smoke tasks, every registered merge method merges the
LoRA deltas, and the report and plots are written. Fails if a trained method does not beat the majority baseline.
A few minutes on 2 cores; the cells go to a fresh folder, so nothing is reused from an earlier run.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from splice.bench.arms import PROBE
from splice.bench.quality import PROFILES, run
from splice.merge.methods.registry import merge_method_names


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    # SPLICE_BENCH_SMOKE_WORK reuses the cells of an earlier smoke run (local iteration); CI starts fresh.
    work = Path(os.environ.get("SPLICE_BENCH_SMOKE_WORK") or tmp_path_factory.mktemp("quality-work"))
    out = tmp_path_factory.mktemp("quality-out")
    results = run("smoke", work=work, out=out, progress=False, command="splice bench quality --profile smoke",
                  log=lambda line: None)
    return results, out, work


def test_every_trained_method_beats_the_majority_baseline_on_every_task(smoke):
    results, _, _ = smoke
    majority = results["baselines"]["majority"]
    assert results["tasks"] == list(PROFILES["smoke"].tasks)
    for key, row in results["adapt"].items():
        for task, cell in row["cells"].items():
            assert cell is not None, f"{key} on {task} did not run"
            assert cell["accuracy"] > majority[task], f"{row['label']} ({row['impl']}) on {task}: " \
                f"{cell['accuracy']:.3f} <= majority {majority[task]:.3f}"
            if key != PROBE:
                assert cell["steps"] > 0 and cell["trainable"] > 0 and cell["step_seconds"] > 0
    assert results["adapt"]["splice_lora_qv"]["cells"]["rt_sentiment"]["trainable"] == 73_728  # r=8 on q,v


def test_every_registered_merge_method_ran_and_mergekit_agrees_where_exact(smoke):
    results, _, _ = smoke
    merges = results["merges"]["lora"]
    assert set(merges) == set(merge_method_names())
    # Refusals the report shows, each for its one reason: methods of one or two models (the benchmark merges
    # several). The data-aware ones run: fisher on each task's Fisher through its frozen head, regmean on Grams.
    refused = {"slerp": "takes exactly", "nearswap": "takes exactly", "nuslerp": "takes exactly",
               "passthrough": "takes exactly"}
    for name, cells in merges.items():
        assert cells["splice"] is not None, name
        error = cells["splice"].get("error")
        assert error is None or (name in refused and refused[name] in error), f"{name}: {error}"
    for name in ("fisher", "regmean"):  # splice only (mergekit has neither)
        ours = merges[name]["splice"]
        assert "error" not in ours, f"{name}: {ours.get('error')}"
        assert 0.5 < ours["normalized"] < 1.5, name
    for name in ("task_arithmetic", "ties", "linear", "breadcrumbs_ties", "model_stock"):
        ours = merges[name]["splice"]
        assert "error" not in ours, f"{name}: {ours.get('error')}"
        assert 0.5 < ours["normalized"] < 1.5
        theirs = merges[name]["mergekit"]
        assert theirs is not None and "error" not in theirs, f"mergekit {name}: {theirs}"
        assert theirs["test"] == ours["test"], name  # deterministic methods: the same merged weights
        assert theirs["max_abs_diff"] < 1e-3, name
    for name in ("task_arithmetic", "linear", "model_stock"):  # not one float differs
        assert merges[name]["mergekit"]["same_weights"] and merges[name]["mergekit"]["max_abs_diff"] == 0.0
    assert "takes exactly" in merges["slerp"]["splice"]["error"]  # a two-model method reports why, in one line


def test_report_and_plots_are_written(smoke):
    _, out, _ = smoke
    report = (out / "quality-smoke.md").read_text()
    assert "Reproduce: `splice bench quality --profile smoke`" in report
    n = len(PROFILES["smoke"].tasks)
    assert "## Adapters" in report and f"## Merges of the {n} LoRA q,v deltas, densified" in report
    for png in ("accuracy", "merges", "params"):
        assert (out / f"quality-smoke-{png}.png").stat().st_size > 1000


def test_a_fresh_machine_resumes_from_the_cells_folder_retraining_only_what_a_pending_merge_needs(smoke, tmp_path):
    """--cells: the finished cells and heads travel (committed); the fine-tunes do not. On a machine with an
    empty cache, only the merge inputs are re-trained, and only while a merge cell is still missing."""
    results, _, work = smoke
    cells = tmp_path / "cells"
    shutil.copytree(work, cells / work.name, ignore=shutil.ignore_patterns("finetunes"))
    dropped = cells / work.name / "cells" / "merge" / "lora" / "task_arithmetic" / "test.json"
    before = json.loads(dropped.read_text())
    dropped.unlink()
    computed: list[str] = []
    again = run("smoke", work=tmp_path / work.name, cells=cells, out=tmp_path / "out", progress=False,
                log=computed.append)
    tasks = PROFILES["smoke"].tasks
    assert [c for c in computed if c.startswith("[")] == \
        [f"[adapt/{t}/splice_lora_qv]" for t in tasks] + ["[merge/lora/task_arithmetic/test]"]
    for t in tasks:  # the same seed and data re-train the same fine-tune, bit for bit, so the merges stand
        assert again["adapt"]["splice_lora_qv"]["cells"][t]["weights_sha256"] == \
            results["adapt"]["splice_lora_qv"]["cells"][t]["weights_sha256"]
    assert json.loads(dropped.read_text())["test"] == before["test"]
    assert not (tmp_path / work.name / "heads").exists()  # heads live beside the cells

    computed.clear()  # every merge finished: nothing is re-trained although the new fine-tunes are gone again
    shutil.rmtree(tmp_path / work.name / "finetunes" / "lora")
    run("smoke", work=tmp_path / work.name, cells=cells, out=tmp_path / "out", progress=False, log=computed.append)
    assert [c for c in computed if c.startswith("[")] == []

    # A re-trained input that is not bit-identical (another CPU, say) restarts that kind's merge table, so no
    # merge mixes fine-tunes of two runs.
    computed.clear()
    cell = cells / work.name / "cells" / "adapt" / "bbc_news" / "splice_lora_qv.json"
    cell.write_text(json.dumps({**json.loads(cell.read_text()), "weights_sha256": "0" * 64}))
    dropped.unlink()
    assert not (tmp_path / work.name / "finetunes" / "lora").exists()  # removed above, and nothing re-trained
    run("smoke", work=tmp_path / work.name, cells=cells, out=tmp_path / "out", progress=False, mergekit=False,
        log=computed.append)
    assert "adapt/bbc_news/splice_lora_qv: re-trained weights differ from the earlier run's; the lora merge " \
           "table restarts" in computed
    merged = {c for c in computed if c.startswith("[merge/lora/") and c.endswith("/test]")}
    assert merged == {f"[merge/lora/{m}/test]" for m in merge_method_names()}


def test_merge_inputs_and_base_are_saved_as_self_contained_model_folders(smoke):
    from splice.io.models import load_model

    _, _, work = smoke
    for folder in (work / "finetunes" / "base", work / "finetunes" / "lora" / "rt_sentiment"):
        model, tokenizer = load_model(str(folder), "encoder")
        assert tokenizer("a test")["input_ids"][0] == tokenizer.cls_token_id
