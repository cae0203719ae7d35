"""The one exception type splice raises for bad input.

The CLI turns a `SpliceError` into a single line on stderr and a non-zero exit, so every message must name the
file, tensor or field at fault and say what was expected.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpliceError(ValueError):
    """Bad input: the message is one line that names the file, tensor or field at fault."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean ...?)' suffix naming the closest valid choices, or '' when none is close."""
    matches = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(repr(m) for m in matches)}?)" if matches else ""
