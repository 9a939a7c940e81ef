"""Conformance suites for tiered_kv's extension points, for users' own implementations and for its built-ins.

Each suite is a test class to subclass in your own test file (like zarr's ``StoreTests``); the subclass says
what to test (a factory or a fixture), the suite checks it against an independent model (a dict the suite keeps
itself), never against the object under test.

========================  ==========================================================  ===========================
Suite                     What it checks                                              You provide
========================  ==========================================================  ===========================
EvictionPolicyTests       an eviction policy's promises (evictable set, victims,      ``spec = PolicySpec(f)``
                          candidates, remove/clear, reference order, inside a pool)
RegisteredPolicyTests     the above for every name in ``available_policies()``        ``specs`` (optional)
BlockStorageTests         a pool's block storage: scatter/gather/views/staging/commit  ``make_storage(...)``
                          per its capability flags, against a dict slot -> bytes
BackendConformance        a disk backend under the disk store (round trips, restart,  ``make_backend()``
                          locking, layout checks, grow/shrink, verify/repair)
RemoteStoreTests          a Redis (single server or cluster) remote store             ``remote_url`` fixture
PoolStateMachine          a pool (any tier, any policy) through the public pool API   ``make_manager()``
MatchSourceTests          a match source (pool, queued snapshots, remote tier):       ``open_source(...)``
                          runs, higher tiers, expected tokens, bytes, parents
========================  ==========================================================  ===========================

Example (``tests/test_my_policy.py``)::

    from tiered_kv.testing import EvictionPolicyTests, PolicySpec

    class TestMyPolicy(EvictionPolicyTests):
        spec = PolicySpec(MyPolicy, exact_candidates=True)

then ``pytest tests/test_my_policy.py``. The suites need pytest and hypothesis: ``pip install tiered_kv[testing]``.

"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ArcReference",
    "BUILTIN_SPECS",
    "BackendConformance",
    "BlockStorageTests",
    "DiskPoolStateMachine",
    "EvictionPolicyTests",
    "LruReference",
    "MatchSourceTests",
    "PolicySpec",
    "PoolStateMachine",
    "RegisteredPolicyTests",
    "RemoteStoreTests",
    "SourceEntry",
]

# Imported on first use, so that ``import tiered_kv.testing`` works (and says what is missing) without pytest.
_WHERE = {
    "ArcReference": "policies",
    "BUILTIN_SPECS": "policies",
    "EvictionPolicyTests": "policies",
    "LruReference": "policies",
    "PolicySpec": "policies",
    "RegisteredPolicyTests": "policies",
    "BlockStorageTests": "storage",
    "BackendConformance": "disk",
    "RemoteStoreTests": "remote",
    "PoolStateMachine": "pool_machine",
    "DiskPoolStateMachine": "pool_machine",
    "MatchSourceTests": "match_sources",
    "SourceEntry": "match_sources",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tiered_kv.testing' has no attribute {name!r}")
    try:
        mod = importlib.import_module(f".{module}", __name__)
    except ImportError as exc:
        if exc.name in ("pytest", "hypothesis", "_pytest"):
            raise ImportError(
                f"tiered_kv.testing.{name} needs pytest and hypothesis: pip install 'tiered_kv[testing]'"
            ) from exc
        raise
    return getattr(mod, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
