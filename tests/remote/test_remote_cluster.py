"""RemoteStore against a real 3-master Redis Cluster: spread, redirects, a dead node, a stalled node."""

from __future__ import annotations

import time
from collections import Counter

import pytest

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install redis)")

from redis.crc import key_slot  # noqa: E402

from tiered_kv.storage.remote import RemoteStore  # noqa: E402

from .redis_servers import RedisCluster, RedisServer, free_port  # noqa: E402
from .remote_data import ALGO, MODEL, NAMESPACE, SMALL_BF16, blocks_for, hashes, same, wait_until_served  # noqa: E402


def make_store(cluster: RedisCluster, namespace: str = NAMESPACE, **kw: object) -> RemoteStore:
    kw.setdefault("timeout", 0.3)
    kw.setdefault("retry_interval", 0.5)
    return RemoteStore(cluster.urls, model=MODEL, namespace=namespace, hash_algorithm=ALGO, **kw)  # type: ignore[arg-type]


def owners(cluster: RedisCluster, store: RemoteStore, hs: list[bytes]) -> list[int]:
    """Port of the master owning each hash's key (from CLUSTER SLOTS)."""
    table: dict[int, int] = {}
    for start, end, master, *_ in cluster.servers[0].client().execute_command("CLUSTER", "SLOTS"):
        for slot in range(int(start), int(end) + 1):
            table[slot] = int(master[1])
    return [table[key_slot(store.key(h))] for h in hs]


def test_round_trip_spread_over_all_masters(shared_cluster: RedisCluster) -> None:
    hs = hashes("spread", 600)
    data = blocks_for(hs, MODEL)
    with make_store(shared_cluster, namespace="spread", max_batch=16) as store:
        assert store.put_blocks(hs, data) == 600
        out, ok = store.get_blocks(hs)
        assert all(ok) and same(out, data)
        assert store.exists(hs[:10]) == [True] * 10
        m = store.metrics()
        assert m["nodes"] == 3 and m["hits"] == 600 and m["redirects"] == 0 and m["corrupt"] == 0
        # Every master holds a fair share: no hash tag pins the namespace to one slot.
        per_node = Counter(owners(shared_cluster, store, hs))
        assert len(per_node) == 3 and min(per_node.values()) > 120, per_node
        for server in shared_cluster.servers:
            assert server.client().dbsize() == per_node[server.port]
        store.delete(hs[:100])
        assert store.get_blocks(hs[:100])[1] == [False] * 100


def test_one_seed_is_enough_and_small_blocks(shared_cluster: RedisCluster) -> None:
    hs = hashes("seed", 200)
    data = blocks_for(hs, SMALL_BF16)
    with RemoteStore(
        [shared_cluster.urls[1]], model=SMALL_BF16, namespace="seed", hash_algorithm=ALGO, timeout=0.3
    ) as store:
        assert store.metrics()["nodes"] == 3
        assert store.put_blocks(hs, data) == 200
        out, ok = store.get_blocks(hs)
        assert all(ok) and same(out, data)


def test_unreachable_cluster_at_construction_is_not_an_error() -> None:
    urls = [f"redis://127.0.0.1:{free_port()}" for _ in range(3)]
    t0 = time.monotonic()
    with RemoteStore(urls, model=MODEL, namespace="none", hash_algorithm=ALGO, timeout=0.3) as store:
        hs = hashes("none", 4)
        assert store.get_blocks(hs)[1] == [False] * 4
        assert store.put_blocks(hs, blocks_for(hs, MODEL)) == 0
        assert store.exists(hs) == [False] * 4
        m = store.metrics()
        assert m["misses"] == 4 and m["put_failures"] == 4 and m["unavailable"] >= 8
    assert time.monotonic() - t0 < 6  # no hang; generous for a loaded CI machine


def _migrate_slot(cluster: RedisCluster, slot: int, src: RedisServer, dst: RedisServer, keys: list[bytes]) -> None:
    """Move ``slot`` from src to dst the way redis-cli --cluster reshard does, keys first."""
    src_id, dst_id = cluster.node_id(src), cluster.node_id(dst)
    dst.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    src.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    if keys:
        src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)


def _finish_slot(cluster: RedisCluster, slot: int, src: RedisServer, dst: RedisServer) -> None:
    dst_id = cluster.node_id(dst)
    rest = src.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
    if rest:
        src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *rest)
    for server in [dst, src] + [s for s in cluster.servers if s not in (src, dst)]:
        server.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


def test_follows_ask_during_migration_and_moved_after(cluster: RedisCluster) -> None:
    hs = hashes("reshard", 300)
    data = blocks_for(hs, MODEL)
    with make_store(cluster, namespace="reshard") as store:
        assert store.put_blocks(hs, data) == 300
        h = hs[0]
        key = store.key(h)
        slot = key_slot(key)
        src = cluster.owner(key)
        dst = next(s for s in cluster.servers if s is not src)
        # Mid-migration: the key already moved -> the source answers ASK; the store must send ASKING + GET.
        _migrate_slot(cluster, slot, src, dst, [key])
        out, ok = store.get_blocks([h])
        assert ok == [True] and same(out[0], data[0])
        assert store.metrics()["redirects"] >= 1
        # Migration done: the store's slot table is stale -> MOVED; it follows and updates the table.
        _finish_slot(cluster, slot, src, dst)
        cluster.wait_ok()
        before = store.metrics()["redirects"]
        out, ok = store.get_blocks(hs)
        assert all(ok) and same(out, data)
        assert store.metrics()["redirects"] > before
        # Writes to the moved slot land on the new owner.
        data2 = blocks_for(hashes("reshard-2", 1), MODEL)
        assert store.put_blocks([h], data2) == 1
        assert dst.client().get(key)[-MODEL.block_size_bytes :] == data2.view(-1).numpy().tobytes()
        out, ok = store.get_blocks([h])
        assert ok == [True] and same(out[0], data2[0])


def test_node_killed_mid_run(cluster: RedisCluster) -> None:
    hs = hashes("kill", 300)
    data = blocks_for(hs, MODEL)
    timeout = 0.3
    with make_store(cluster, namespace="kill", timeout=timeout) as store:
        assert store.put_blocks(hs, data) == 300
        own = owners(cluster, store, hs)
        victim = cluster.servers[1]
        on_victim = [o == victim.port for o in own]
        assert 0 < sum(on_victim) < 300
        victim.kill()
        for _ in range(2):
            t0 = time.monotonic()
            out, ok = store.get_blocks(hs)
            assert time.monotonic() - t0 < 2 * timeout + 1.5
            assert ok == [not v for v in on_victim]
            assert same(out[[i for i, v in enumerate(ok) if v]], data[[i for i, v in enumerate(ok) if v]])
            assert store.exists(hs) == ok
            t0 = time.monotonic()
            assert store.put_blocks(hs, data) == 300 - sum(on_victim)
            assert time.monotonic() - t0 < 2 * timeout + 1.5
        # Once the cluster has noticed (cluster-require-full-coverage no), the survivors keep serving; there is no
        # event for "noticed", so poll, bounded.
        deadline = time.monotonic() + 10
        while store.get_blocks(hs)[1] != [not v for v in on_victim]:
            assert time.monotonic() < deadline, "the surviving nodes did not keep serving"
            time.sleep(0.05)
        m = store.metrics()
        assert m["connection_errors"] >= 1 and m["put_failures"] >= sum(on_victim)


def test_stalled_node_sigstop_then_sigcont(cluster: RedisCluster) -> None:
    hs = hashes("stall", 240)
    data = blocks_for(hs, MODEL)
    timeout = 0.3
    with make_store(cluster, namespace="stall", timeout=timeout, retry_interval=0.5) as store:
        assert store.put_blocks(hs, data) == 240
        own = owners(cluster, store, hs)
        victim = cluster.servers[2]
        on_victim = [o == victim.port for o in own]
        victim.stop_signal()
        try:
            for _ in range(3):
                t0 = time.monotonic()
                _, ok = store.get_blocks(hs)
                elapsed = time.monotonic() - t0
                assert elapsed < 2 * timeout + 1.5, elapsed
                assert ok == [not v for v in on_victim]
                t0 = time.monotonic()
                assert store.put_blocks(hs, data) == 240 - sum(on_victim)
                assert time.monotonic() - t0 < 2 * timeout + 1.5
            assert store.metrics()["timeouts"] >= 1
        finally:
            victim.cont_signal()
        wait_until_served(store, hs, data, "node did not come back")
