"""``tiered_kv.testing.RemoteStoreTests`` on a real single redis-server and on a real 3-master Redis Cluster.

The servers come from ``tests/remote/redis_servers.py`` (the remote tier tests' helpers); the whole module is
skipped, with the reason, where redis-server or redis-py is missing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from remote.redis_servers import RedisCluster, RedisServer, missing_reason

from tiered_kv.testing import RemoteStoreTests

_REASON = missing_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"remote conformance needs Redis: {_REASON}")


@pytest.fixture(scope="module")
def single_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def three_masters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster
    finally:
        cluster.close()


class TestSingleServer(RemoteStoreTests):
    @pytest.fixture
    def remote_url(self, single_server: RedisServer) -> str:
        return single_server.url


class TestCluster(RemoteStoreTests):
    @pytest.fixture
    def remote_url(self, three_masters: RedisCluster) -> list[str]:
        return three_masters.urls
