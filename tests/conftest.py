"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kvdata import SMALL

from tiered_kv import KvBlockManager, KvBlockManagerConfig, LayoutConfig


@pytest.fixture
def two_tier() -> Iterator[KvBlockManager]:
    cfg = KvBlockManagerConfig(
        model=SMALL, device=LayoutConfig(num_blocks=4), host=LayoutConfig(num_blocks=8), device_type="cpu"
    )
    with KvBlockManager(cfg) as bm:
        yield bm
