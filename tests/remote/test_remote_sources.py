"""The remote tier passes the match-source conformance suite, on one server and on a cluster."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kvdata import SMALL

from tiered_kv import KvBlockManagerConfig, LayoutConfig, RemoteConfig
from tiered_kv.remote import RemoteTier
from tiered_kv.sources import MatchSource
from tiered_kv.testing import MatchSourceTests, SourceEntry

from .redis_servers import RedisCluster, RedisServer

_namespaces = itertools.count()


class _RemoteSuite(MatchSourceTests):
    stores_parents = False
    exact_may_hold = False  # only the round trip in match_run can tell
    url: str | list[str] = ""

    @contextlib.contextmanager
    def open_source(self, entries: list[SourceEntry], tmp_path: Path) -> Iterator[MatchSource]:
        cfg = KvBlockManagerConfig(
            model=SMALL, host=LayoutConfig(num_blocks=4), device_type="cpu", namespace=f"src{next(_namespaces)}"
        )
        remote = RemoteTier(cfg, RemoteConfig(url=self.url))
        try:
            assert remote.store.put_blocks(
                [e.sequence_hash for e in entries], torch.stack([e.data for e in entries]), [e.tokens for e in entries]
            ) == len(entries)
            yield remote
        finally:
            remote.close()


class TestSingleServer(_RemoteSuite):
    @pytest.fixture(autouse=True)
    def _server(self, shared_server: RedisServer) -> None:
        self.url = shared_server.url


class TestCluster(_RemoteSuite):
    @pytest.fixture(autouse=True)
    def _cluster(self, shared_cluster: RedisCluster) -> None:
        self.url = shared_cluster.urls
