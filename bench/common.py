"""Shared helpers for the benchmarks in bench/: machine description, RSS, interleaved timing, markdown output.

Speed on a shared machine is only meaningful as a ratio against an anchor measured in the same run, with the
configurations interleaved so that noise hits all of them alike; memory is only meaningful per fresh process.
"""
from __future__ import annotations

import datetime
import os
import platform
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# -- machine ---------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, str]:
    import torch

    info = {
        "CPU": f"{cpu_model()} ({os.cpu_count()} logical CPUs visible)",
        "torch threads": str(threads),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        info["load average at start"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    return info


# -- memory ----------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        kib = _status_kib("VmRSS")
        if kib is None:
            raise RuntimeError("cannot read RSS: install psutil or run on Linux") from None
        return kib * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; since the last `reset_peak_rss()` where that worked)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to /proc/self/clear_refs). True if it worked."""
    try:
        before = _status_kib("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")
        after = _status_kib("VmHWM")
        return before is not None and after is not None and after <= before
    except OSError:
        return False


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


# -- timing ----------------------------------------------------------------------------------------------------------
def interleaved(
    runners: dict[str, Callable[[], dict[str, float] | None]],
    rounds: int,
    per_round: int,
    warmup: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, list[list[dict[str, float]]]]:
    """Run every runner `warmup` times, then `rounds` rounds of `per_round` timed calls each, round-robin.

    The order of the configurations is shuffled in every round (fixed seed) so that neither a slow drift of the
    machine nor a position in the round favours one of them. A runner may return a dict of phase timings
    (seconds); the total wall time of the call is always recorded under "total".

    Returns:
        name → per round → per call → {"total": s, phase: s, ...}
    """
    names = list(runners)
    for w in range(warmup):
        for n in names:
            runners[n]()
        log(f"  warm-up {w + 1}/{warmup} done")
    out: dict[str, list[list[dict[str, float]]]] = {n: [] for n in names}
    rng = random.Random(seed)
    for r in range(rounds):
        order = names[:]
        rng.shuffle(order)
        t_round = time.perf_counter()
        for n in order:
            calls = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                phases = runners[n]() or {}
                calls.append({"total": time.perf_counter() - t0, **phases})
            out[n].append(calls)
        log(f"  round {r + 1}/{rounds} done in {time.perf_counter() - t_round:.0f} s")
    return out


def round_means(samples: list[list[dict[str, float]]], key: str = "total") -> list[float]:
    return [statistics.fmean(c[key] for c in calls) for calls in samples]


def median_all(samples: list[list[dict[str, float]]], key: str = "total") -> float:
    return statistics.median(c[key] for calls in samples for c in calls if key in c)


def ratio_stats(num: list[list[dict[str, float]]], den: list[list[dict[str, float]]]) -> tuple[float, float, float]:
    """Median, min and max over rounds of (num's round mean / den's round mean): paired within each round."""
    ratios = [a / b for a, b in zip(round_means(num), round_means(den))]
    return statistics.median(ratios), min(ratios), max(ratios)


def fmt_ratio(stats: tuple[float, float, float]) -> str:
    med, lo, hi = stats
    return f"{med:.2f}× ({lo:.2f}–{hi:.2f})"


# -- markdown --------------------------------------------------------------------------------------------------------
def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace the `## heading` section of `path` (up to the next `## ` heading) with `body`, keeping the rest."""
    section = f"{heading}\n\n{body.strip()}\n"
    if path.exists():
        text = path.read_text()
        pattern = re.compile(rf"^{re.escape(heading)}\s*$.*?(?=^## |\Z)", re.M | re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: section + "\n", text, count=1)
        else:
            text = text.rstrip() + "\n\n" + section
    else:
        text = "# Benchmarks\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
