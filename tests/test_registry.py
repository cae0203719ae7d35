"""The registry shape every kind of method shares: built-ins load on first lookup, once; typos get a suggestion."""
from __future__ import annotations

import pytest

from splice.errors import SpliceError
from splice.registry import Registry


def test_builtins_load_once_on_first_lookup_and_twice_registered_is_refused():
    calls = []
    reg: Registry[int] = Registry("widget", lambda: (calls.append(1), reg.add("spanner", 1)))
    assert calls == [] and reg.names() == ["spanner"] and reg.lookup("spanner") == 1 and calls == [1]
    with pytest.raises(ValueError, match="widget 'spanner' is registered twice"):
        reg.add("spanner", 2)


def test_an_unknown_name_is_one_line_with_the_closest_known_names():
    reg: Registry[int] = Registry("widget", lambda: None)
    reg.add("spanner", 1)
    with pytest.raises(SpliceError, match=r"unknown widget 'spaner' \(did you mean 'spanner'\?\); known: spanner"):
        reg.lookup("spaner")


def test_a_failed_load_is_retried_on_the_next_lookup():
    attempts = []

    def load():
        attempts.append(1)
        if len(attempts) == 1:
            raise ImportError("a method module failed to import")
    reg: Registry[int] = Registry("widget", load)
    with pytest.raises(ImportError):
        reg.names()
    assert reg.names() == [] and len(attempts) == 2
