"""``tiered_kv.testing.RemoteStoreTests`` on a real single redis-server and on a real 3-master Redis Cluster.

The servers are this directory's shared fixtures (``conftest.py``); the directory is skipped, with the reason,
where redis-server or redis-py is missing.
"""

from __future__ import annotations

import pytest

from tiered_kv.testing import RemoteStoreTests

from .redis_servers import RedisCluster, RedisServer


class TestSingleServer(RemoteStoreTests):
    @pytest.fixture
    def remote_url(self, shared_server: RedisServer) -> str:
        return shared_server.url


class TestCluster(RemoteStoreTests):
    @pytest.fixture
    def remote_url(self, shared_cluster: RedisCluster) -> list[str]:
        return shared_cluster.urls
