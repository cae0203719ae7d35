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


def source_digest(folder: Path) -> str:
    """Short sha256 over the .py files under `folder` (names and contents): which library code was measured."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.py")):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


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
    if _status_kib("VmHWM") is None:
        return False
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


# -- timing ----------------------------------------------------------------------------------------------------------
class CpuLoad:
    """How much CPU other processes used while we ran: the shared machine's noise, measured rather than guessed.

    Share = (busy CPU time of the whole machine − this process's CPU time) / (wall time × CPUs), from /proc/stat
    (steal time counts as busy). None where /proc/stat is unreadable (then nothing is discarded).
    """

    def __init__(self) -> None:
        self.ncpu = os.cpu_count() or 1
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ok = self._busy() is not None

    @staticmethod
    def _busy() -> float | None:
        try:
            f = Path("/proc/stat").read_text().splitlines()[0].split()
        except (OSError, IndexError):
            return None
        v = [int(x) for x in f[1:9]]  # user nice system idle iowait irq softirq steal
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]

    def snap(self) -> tuple[float, float | None, float]:
        t = os.times()
        return time.perf_counter(), self._busy(), t.user + t.system

    def foreign(self, a, b) -> float | None:
        if a[1] is None or b[1] is None:
            return None
        wall = max(b[0] - a[0], 1e-3)
        other = (b[1] - a[1]) / self.tick - (b[2] - a[2])
        return max(other, 0.0) / (wall * self.ncpu)

    def wait_quiet(self, limit: float, max_wait_s: float, log: Callable[[str], None]) -> float:
        """Sleep in 1 s probes until other processes use ≤ `limit` of the CPUs; returns the seconds waited."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < max_wait_s:
            a = self.snap()
            time.sleep(1.0)
            share = self.foreign(a, self.snap())
            if share is None or share <= limit:
                break
        return time.perf_counter() - t0


def interleaved(
    runners: dict[str, Callable[[], object]],
    rounds: int,
    per_round: int,
    warmup: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
    budget_s: float | None = None,
    min_rounds: int = 2,
    max_foreign: float = 0.10,
    retries: int = 3,
    max_wait_s: float = 45.0,
    stats: dict | None = None,
) -> dict[str, list[list[dict[str, float]]]]:
    """Run every runner `warmup` times, then up to `rounds` rounds of `per_round` timed calls each, round-robin.

    The order of the configurations is shuffled in every round (fixed seed) so that neither a slow drift of the
    machine nor a position in the round favours one of them. A call during which other processes used more than
    `max_foreign` of the CPUs is discarded and retried (up to `retries` times) once the machine is quiet again;
    `stats` receives the counts. A runner may return a dict of phase timings (seconds); the total wall time of the
    call is always recorded under "total", the foreign CPU share under "foreign". With `budget_s`, rounds stop
    (after at least `min_rounds`) when the next round would end past the budget, counted from the first round.

    Returns:
        name → per round → per call → {"total": s, "foreign": share, phase: s, ...}
    """
    names = list(runners)
    load = CpuLoad()
    stats = {} if stats is None else stats
    stats.update(discarded=0, kept_under_load=0, waited_s=0.0, calls=0)
    for w in range(warmup):
        for n in names:
            runners[n]()
        log(f"  warm-up {w + 1}/{warmup} done")
    out: dict[str, list[list[dict[str, float]]]] = {n: [] for n in names}
    rng = random.Random(seed)
    t_start = time.perf_counter()
    for r in range(rounds):
        spent = time.perf_counter() - t_start
        if budget_s is not None and r >= min_rounds and spent + spent / r > budget_s:
            log(f"  stopping after {r} rounds: time budget {budget_s:.0f} s")
            break
        order = names[:]
        rng.shuffle(order)
        t_round = time.perf_counter()
        for n in order:
            calls = []
            for _ in range(per_round):
                for attempt in range(retries + 1):
                    if attempt:
                        stats["waited_s"] += load.wait_quiet(max_foreign, max_wait_s, log)
                    a = load.snap()
                    res = runners[n]()
                    b = load.snap()
                    share = load.foreign(a, b)
                    if share is None or share <= max_foreign:
                        break
                    if attempt < retries:
                        stats["discarded"] += 1
                    else:
                        stats["kept_under_load"] += 1
                phases = res if isinstance(res, dict) else {}
                calls.append({"total": b[0] - a[0], "foreign": share if share is not None else 0.0, **phases})
                stats["calls"] += 1
            out[n].append(calls)
        log(f"  round {r + 1}/{rounds} done in {time.perf_counter() - t_round:.0f} s "
            f"(discarded so far: {stats['discarded']}, waited {stats['waited_s']:.0f} s)")
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
