"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kvdata import SMALL

from tiered_kv import KvBlockManager, KvBlockManagerConfig, LayoutConfig, OffloadConfig


@pytest.fixture
def two_tier() -> Iterator[KvBlockManager]:
    # No background cleaner: which blocks a test finds where must not depend on thread timing (a cleaner holding
    # the next victims while the test allocates makes eviction pick others). Tests of the cleaner build their own.
    cfg = KvBlockManagerConfig(
        model=SMALL, device=LayoutConfig(num_blocks=4), host=LayoutConfig(num_blocks=8), device_type="cpu",
        offload=OffloadConfig(background_cleaning=False),
    )
    with KvBlockManager(cfg) as bm:
        yield bm
