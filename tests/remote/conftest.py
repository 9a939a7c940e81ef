"""Fixtures: real redis-server processes on free loopback ports, stopped at teardown.

The whole directory is skipped, with the reason, when ``redis-server``/``redis-cli`` are not on PATH or redis-py
does not import (CI installs both: ``apt-get install -y redis-server`` and ``pip install redis``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .redis_servers import RedisCluster, RedisServer, missing_reason

_REASON = missing_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _REASON is None:
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=f"remote tier tests need Redis: {_REASON}")
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh single server for one test."""
    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One single server shared by a module's tests (each test uses its own namespace)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A 3-master cluster shared by a module's tests that do not break it."""
    with RedisCluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A fresh 3-master cluster for a test that kills, stops or reshards nodes."""
    with RedisCluster(tmp_path) as c:
        yield c
