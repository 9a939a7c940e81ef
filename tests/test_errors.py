"""The exception tree: one module, drawn in its docstring, every error a TieredKvError."""

from __future__ import annotations

import re

import tiered_kv
from tiered_kv import errors


def test_every_error_is_drawn_in_the_tree_under_its_parent() -> None:
    doc = errors.__doc__ or ""
    drawn: dict[str, int] = {}  # class name -> depth in the drawing
    for line in doc.splitlines():
        m = re.match(r"^\s*((?:[│ ]   )*)(?:[├└]── )?([A-Z]\w+)\b", line)
        if m and m.group(2) in errors.__all__:
            drawn[m.group(2)] = len(m.group(1)) // 4 + (0 if m.group(2) == "TieredKvError" else 1)
    assert set(drawn) == set(errors.__all__), set(errors.__all__) ^ set(drawn)
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.TieredKvError)
        assert getattr(tiered_kv, name) is cls, f"{name} is not exported from tiered_kv"
        parents = [b for b in cls.__bases__ if issubclass(b, errors.TieredKvError)]
        if cls is not errors.TieredKvError:
            assert len(parents) == 1 and drawn[name] == drawn[parents[0].__name__] + 1, name


def test_the_tier_errors_keep_their_old_homes_and_parents() -> None:
    from tiered_kv.storage.remote import RemoteTierError
    from tiered_kv.storage.remote.store import RemoteTierError as from_store

    assert RemoteTierError is from_store is errors.RemoteTierError
    assert errors.RemoteTierError.__bases__ == (errors.TieredKvError,)
    assert issubclass(errors.TierLockedError, errors.DiskTierError)  # ``except DiskTierError`` still catches it
