"""The benchmark's cell cache: one JSON file per finished cell, so a re-run (or the next chunk) skips it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from splice.io.checkpoints import write_json


class Store:
    """Results keyed by a slash path ("adapt/rt_sentiment/splice_lora_qv"), each written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _file(self, key: str) -> Path:
        return self.root / "cells" / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        f = self._file(key)
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None

    def put(self, key: str, value: dict[str, Any]) -> dict[str, Any]:
        f = self._file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        write_json(f, value, indent=1, sort_keys=True)
        return value

    def drop(self, key: str) -> None:
        """Forget one cell, or every cell under a key prefix ("merge/full")."""
        import shutil

        self._file(key).unlink(missing_ok=True)
        shutil.rmtree(self.root / "cells" / key, ignore_errors=True)

    def log_run(self, entry: dict[str, Any]) -> list[dict[str, Any]]:
        """Append one invocation (start, seconds, cells done) to runs.json; returns every invocation so far."""
        import fcntl

        f = self.root / "runs.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        with open(self.root / "runs.lock", "w") as lock:  # shards append side by side
            fcntl.flock(lock, fcntl.LOCK_EX)
            runs = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else []
            runs.append(entry)
            write_json(f, runs, indent=1)
        return runs

    def check_data(self, digests: dict[str, str]) -> None:
        """Refuse cells computed on other data (a Debian package updated since, another cap): the first run writes
        each task's digest to data.json, later runs must match it; a task new to the folder is added."""
        from splice.errors import SpliceError

        f = self.root / "data.json"
        known = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        differ = [t for t, d in digests.items() if t in known and known[t] != d]
        if differ:
            raise SpliceError(f"{self.root}: task {differ[0]!r} has other data than the finished cells were computed "
                              "on (its train/val/test digest differs); use a fresh --cells folder")
        if any(t not in known for t in digests):
            f.parent.mkdir(parents=True, exist_ok=True)
            write_json(f, {**known, **digests}, indent=1, sort_keys=True)

    def runs(self) -> list[dict[str, Any]]:
        f = self.root / "runs.json"
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else []
