"""Peak resident memory of this process over a block of code (Linux: VmHWM, reset through /proc/self/clear_refs)."""
from __future__ import annotations

import resource
import sys
from pathlib import Path
from types import TracebackType


def _vm_hwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRss:
    """`with PeakRss() as m: ...` then `m.peak_mib`: the process's peak RSS during the block.

    Where the peak cannot be reset (not Linux) it is the peak since the process started, which can only be higher.
    """

    def __enter__(self) -> "PeakRss":
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.peak_mib: float | None = None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        kib = _vm_hwm_kib()
        if kib is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kib = peak // 1024 if sys.platform == "darwin" else peak
        self.peak_mib = kib / 1024
