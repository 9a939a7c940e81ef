"""The pool state machine of ``tiered_kv.testing`` on every built-in policy, both arena layouts and the disk tier.

The machine keeps its own dict model and uses the public pool API only (see ``tiered_kv/testing/pool_machine.py``).
"""

from __future__ import annotations

import pytest
from hypothesis import settings

from tiered_kv.testing import DiskPoolStateMachine, PoolStateMachine

_FAST = settings(max_examples=30, stateful_step_count=40, deadline=None)
#: python -m pytest -m slow tests/test_pool_state_machine.py: the same machines, searched ten times longer.
_DEEP = settings(max_examples=300, stateful_step_count=50, deadline=None)


class ArcContiguous(PoolStateMachine):
    policy = "arc"
    layout = "fully_contiguous"


class LruLayerSeparate(PoolStateMachine):
    policy = "lru"
    layout = "layer_separate"
    reference_lru = True


class NoEviction(PoolStateMachine):
    policy = "none"
    evicts = False


class DiskLru(DiskPoolStateMachine):
    policy = "lru"
    reference_lru = True


TestArcContiguous = ArcContiguous.TestCase
TestArcContiguous.settings = _FAST
TestLruLayerSeparate = LruLayerSeparate.TestCase
TestLruLayerSeparate.settings = _FAST
TestNoEviction = NoEviction.TestCase
TestNoEviction.settings = settings(max_examples=20, stateful_step_count=30, deadline=None)
TestDiskLru = DiskLru.TestCase
TestDiskLru.settings = settings(max_examples=15, stateful_step_count=30, deadline=None)


@pytest.mark.slow
class TestDeepArc(ArcContiguous.TestCase):  # type: ignore[misc,valid-type]
    settings = _DEEP


@pytest.mark.slow
class TestDeepLru(LruLayerSeparate.TestCase):  # type: ignore[misc,valid-type]
    settings = _DEEP
