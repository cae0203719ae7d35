"""The real-data quality benchmark: adapters and merges of all-MiniLM-L6-v2 on eight real tasks.

    python bench/quality.py --profile full --max-minutes 9     # repeat until the report lists nothing missing

Same as `splice bench quality ...`; the code lives in `splice.bench` (task loaders, runner, report). Results go to
bench/results/quality.md with PNG plots; the data and fine-tunes to $SPLICE_BENCH_CACHE (default
~/.cache/splice/bench), never into git; the finished cells there too, or with `--cells bench/results/quality-cells`
into the committed folder the full profile resumes from on a new machine.
"""
from __future__ import annotations

import sys

from splice.cli import run

if __name__ == "__main__":
    sys.exit(run(["bench", "quality", *sys.argv[1:]]))
