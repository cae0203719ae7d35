"""bench/serve_grouping.py end to end at one call per path: every batched path gives splice's output (the script
asserts it before timing) and the section it writes has a row per path and group count."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve_grouping.py"


def test_serve_grouping_runs_and_writes_its_section(tmp_path):
    spec = importlib.util.spec_from_file_location("serve_grouping", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "RESULTS.md"
    threads = torch.get_num_threads()
    try:
        module.main(["--rounds", "1", "--calls", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the script sets its own; the rest of the session keeps pytest's
    text = out.read_text()
    assert "## Serving: grouping LoRA rows on CPU (bench/serve_grouping.py)" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 8 |", "| 16 |", "| 28 |"))]
    assert len(rows) == 15 and sum("splice (one group at a time)" in r for r in rows) == 3
