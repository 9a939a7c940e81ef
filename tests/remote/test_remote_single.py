"""RemoteStore against one real redis-server: round trips, verification, isolation, sharing, outages."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install redis)")
import torch  # noqa: E402

from tiered_kv.config import ModelConfig  # noqa: E402
from tiered_kv.errors import ConfigError, TieredKvError  # noqa: E402
from tiered_kv.storage.remote import HEADER_SIZE, RemoteStore, RemoteTierError  # noqa: E402

from .redis_servers import RedisServer, free_port  # noqa: E402
from .remote_data import (  # noqa: E402
    ALGO,
    MODEL,
    NAMESPACE,
    PYTHON,
    SMALL_BF16,
    blocks_for,
    child_env,
    hashes,
    same,
    wait_until_served,
)

CHILD = str(Path(__file__).with_name("remote_child.py"))


def make_store(
    url: str | list[str], model: ModelConfig = MODEL, namespace: str = NAMESPACE, **kw: object
) -> RemoteStore:
    kw.setdefault("timeout", 0.5)
    return RemoteStore(url, model=model, namespace=namespace, hash_algorithm=ALGO, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float8_e4m3fn", "uint8"])
def test_round_trip_dtypes(shared_server: RedisServer, dtype: str) -> None:
    model = ModelConfig(num_layers=3, inner_dim=64, page_size=8, dtype=dtype)
    hs = hashes(f"dtype-{dtype}", 40)
    data = blocks_for(hs, model)
    with make_store(shared_server.url, model, namespace=f"rt-{dtype}") as store:
        assert store.put_blocks(hs, data) == 40
        out, ok = store.get_blocks(hs)
        assert ok == [True] * 40
        assert out.dtype == model.torch_dtype and tuple(out.shape) == (40, *model.block_shape)
        assert same(out, data)
        m = store.metrics()
        assert (m["puts"], m["hits"], m["misses"], m["corrupt"]) == (40, 40, 0, 0)
        assert m["bytes_out"] == m["bytes_in"] == 40 * model.block_size_bytes


def test_round_trip_large_and_small_blocks_many_chunks(shared_server: RedisServer) -> None:
    for model in (MODEL, SMALL_BF16):
        hs = hashes(f"chunks-{model.dtype}", 300)  # > max_batch: several pipelined chunks in parallel
        data = blocks_for(hs, model)
        with make_store(shared_server.url, model, namespace="chunks", max_batch=32) as store:
            assert store.put_blocks(hs, data) == 300
            out = torch.zeros_like(data)
            got, ok = store.get_blocks(hs, out=out)
            assert got is out and all(ok) and same(out, data)
            assert store.exists(hs[:5] + hashes("never", 2)) == [True] * 5 + [False, False]


def test_miss_delete_overwrite_and_empty(shared_server: RedisServer) -> None:
    hs = hashes("mdo", 6)
    data = blocks_for(hs, MODEL)
    with make_store(shared_server.url, namespace="mdo") as store:
        assert store.get_blocks([])[1] == [] and store.put_blocks([], data[:0]) == 0 and store.exists([]) == []
        assert store.put_blocks(hs[:4], data[:4]) == 4
        _, ok = store.get_blocks(hs)
        assert ok == [True] * 4 + [False] * 2
        store.delete(hs[:2])
        assert store.exists(hs) == [False, False, True, True, False, False]
        assert store.put_blocks(hs[2:3], data[5:6]) == 1  # overwrite: last write wins
        out, ok = store.get_blocks(hs[2:3])
        assert ok == [True] and same(out[0], data[5])
        m = store.metrics()
        assert m["misses"] == 2 + 0 and m["corrupt"] == 0 and m["deletes"] == 2


def test_bad_arguments_raise(shared_server: RedisServer) -> None:
    with make_store(shared_server.url, namespace="bad") as store:
        with pytest.raises(RemoteTierError):
            store.get_blocks([b"short"])
        with pytest.raises(RemoteTierError):
            store.put_blocks(hashes("b", 2), blocks_for(hashes("b", 1), MODEL))
        with pytest.raises(RemoteTierError):
            store.put_blocks(hashes("b", 1), blocks_for(hashes("b", 1), MODEL).float())
        store.close()
        store.close()  # idempotent
        with pytest.raises(RemoteTierError):
            store.get_blocks(hashes("b", 1))
        assert isinstance(RemoteTierError("x"), TieredKvError)
    for kw in ({"timeout": 0}, {"max_batch": 0}, {"namespace": ""}, {"ssl_ca_certs": "/x.pem"}):
        with pytest.raises(ConfigError):
            make_store(shared_server.url, **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        make_store("http://127.0.0.1:1")
    with pytest.raises(ConfigError):
        RemoteStore(shared_server.url, model=MODEL, namespace="x", hash_algorithm="md5")


def _corrupt_cases(store: RemoteStore, other: RemoteStore, hs: list[bytes], raw: bytes) -> dict[int, bytes]:
    """Values to plant under ``hs[i]``: each is wrong in one way."""
    flipped = bytearray(raw)
    flipped[HEADER_SIZE + 100] ^= 0x40
    header_flip = bytearray(raw)
    header_flip[0] ^= 0xFF  # magic
    version = bytearray(raw)
    version[4] = 99
    size = bytearray(raw)
    size[32] ^= 1
    return {
        0: bytes(flipped),  # payload bit flip -> checksum
        1: raw[:-10],  # truncated
        2: b"abc",  # shorter than a header
        3: bytes(header_flip),  # bad magic
        4: bytes(version),  # unknown format version
        5: bytes(size),  # header size field
        6: raw,  # a valid value of ANOTHER hash (key tag mismatch: values can't be moved between keys)
        7: b"",  # empty
    }


def test_corrupted_values_are_misses_counted_and_deleted(shared_server: RedisServer) -> None:
    hs = hashes("corrupt", 10)
    data = blocks_for(hs, MODEL)
    client = shared_server.client()
    other_model = ModelConfig(num_layers=2, inner_dim=256, page_size=16, dtype="bfloat16")  # same size
    with (
        make_store(shared_server.url, namespace="corrupt") as store,
        make_store(shared_server.url, other_model, namespace="corrupt") as other,
    ):
        assert store.put_blocks(hs, data) == 10
        raw = client.get(store.key(hs[9]))
        assert isinstance(raw, bytes) and len(raw) == HEADER_SIZE + MODEL.block_size_bytes
        cases = _corrupt_cases(store, other, hs, raw)
        for i, value in cases.items():
            client.set(store.key(hs[i]), value)
        # Wrong fingerprint: a valid value written by a store of another model (same block size), planted
        # under this model's key.
        assert other.put_blocks(hs[8:9], data[8:9].view(torch.bfloat16)) == 1
        client.set(store.key(hs[8]), client.get(other.key(hs[8])))

        t0 = time.monotonic()
        out, ok = store.get_blocks(hs)
        assert time.monotonic() - t0 < 5  # no hang; generous for a loaded CI machine
        assert ok == [False] * 9 + [True]
        assert same(out[9], data[9])
        m = store.metrics()
        assert m["corrupt"] == 9 and m["misses"] == 9 and m["hits"] == 1
        # Corrupt values were deleted (best effort), so a good copy can be written again.
        assert store.exists(hs) == [False] * 9 + [True]
        assert store.put_blocks(hs[:9], data[:9]) == 9
        out, ok = store.get_blocks(hs)
        assert all(ok) and same(out, data)
        # The other model's own key is untouched and still verifies for it.
        assert other.get_blocks(hs[8:9])[1] == [True]


def test_namespace_and_model_isolation(shared_server: RedisServer) -> None:
    hs = hashes("iso", 8)
    data = blocks_for(hs, MODEL)
    other_model = ModelConfig(num_layers=2, inner_dim=256, page_size=16, dtype="bfloat16")
    with (
        make_store(shared_server.url, namespace="tenant-a") as a,
        make_store(shared_server.url, namespace="tenant-b") as b,
        make_store(shared_server.url, other_model, namespace="tenant-a") as a_other,
        make_store(shared_server.url, namespace="tenant-a:x{y}") as tricky,
    ):
        assert a.put_blocks(hs, data) == 8
        assert b.get_blocks(hs)[1] == [False] * 8
        assert b.exists(hs) == [False] * 8
        assert a_other.get_blocks(hs)[1] == [False] * 8
        assert tricky.get_blocks(hs)[1] == [False] * 8
        assert a.get_blocks(hs)[1] == [True] * 8
        assert b.metrics()["corrupt"] == 0  # different keys, not rejected values
        # Keys never carry a Redis Cluster hash tag, and namespaces can't collide through ':'.
        key = tricky.key(hs[0])
        assert b"{" not in key and b"}" not in key
        assert key.startswith(b"tkv:tenant-a%3Ax%7By%7D:" + MODEL.fingerprint().encode() + b":")
        assert a.key(hs[0]) == b"tkv:tenant-a:" + MODEL.fingerprint().encode() + b":" + hs[0].hex().encode()


def test_two_processes_share_blocks(shared_server: RedisServer) -> None:
    hs = hashes("shared", 50)
    with make_store(shared_server.url, namespace="share") as store:
        assert store.put_blocks(hs, blocks_for(hs, MODEL)) == 50
    # Both children at once (each pays the torch import): one reads what this process wrote, the other
    # writes what this process then reads.
    reader, writer = (
        subprocess.Popen(
            [PYTHON, CHILD, mode, shared_server.url, "share", tag, str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
        )
        for mode, tag, n in (("read", "shared", 60), ("write", "from-child", 20))
    )
    r_out, r_err = reader.communicate(timeout=120)
    w_out, w_err = writer.communicate(timeout=120)
    assert reader.returncode == 0, r_err.decode()
    assert writer.returncode == 0, w_err.decode()
    report = json.loads(r_out.decode().strip().splitlines()[-1])
    assert report == {"hits": 50, "equal": 50, "misses": 10}
    assert json.loads(w_out.decode().strip().splitlines()[-1]) == {"written": 20}
    child_hs = hashes("from-child", 20)
    with make_store(shared_server.url, namespace="share") as store:
        out, ok = store.get_blocks(child_hs)
        assert all(ok) and same(out, blocks_for(child_hs, MODEL))


def test_unreachable_at_construction_then_server_comes_up(tmp_path: Path) -> None:
    port = free_port()
    hs = hashes("late", 5)
    data = blocks_for(hs, MODEL)
    t0 = time.monotonic()
    store = make_store(f"redis://127.0.0.1:{port}", timeout=0.3, retry_interval=0.2)
    try:
        _, ok = store.get_blocks(hs)
        assert ok == [False] * 5
        assert store.put_blocks(hs, data) == 0
        assert store.exists(hs) == [False] * 5
        assert time.monotonic() - t0 < 5  # no hang; generous for a loaded CI machine
        m = store.metrics()
        assert m["put_failures"] == 5 and m["misses"] == 5 and m["connection_errors"] >= 1
        server = RedisServer(tmp_path, port)
        try:
            deadline = time.monotonic() + 5
            while store.put_blocks(hs, data) != 5:
                assert time.monotonic() < deadline, "store did not reconnect"
                time.sleep(0.05)
            out, ok = store.get_blocks(hs)
            assert all(ok) and same(out, data)
            assert store.metrics()["reconnects"] >= 1
        finally:
            server.close()
        # Server gone again: misses, no exception.
        assert store.get_blocks(hs)[1] == [False] * 5
    finally:
        store.close()


def test_stalled_server_is_bounded_and_recovers(redis_server: RedisServer) -> None:
    timeout = 0.3
    hs = hashes("stall", 40)
    data = blocks_for(hs, MODEL)
    with make_store(redis_server.url, timeout=timeout, retry_interval=0.5) as store:
        assert store.put_blocks(hs, data) == 40
        redis_server.stop_signal()
        try:
            for _ in range(3):
                t0 = time.monotonic()
                _, ok = store.get_blocks(hs)
                assert time.monotonic() - t0 < 2 * timeout + 1.5
                assert ok == [False] * 40
                t0 = time.monotonic()
                assert store.put_blocks(hs[:8], data[:8]) == 0
                assert time.monotonic() - t0 < 2 * timeout + 1.5
            assert store.metrics()["timeouts"] >= 1
        finally:
            redis_server.cont_signal()
        wait_until_served(store, hs, data, "store did not recover after SIGCONT")


def test_auth_password_and_acl_user(tmp_path: Path) -> None:
    server = RedisServer(
        tmp_path, extra=["--requirepass", "s3cret", "--user", "alice", "on", ">alicepw", "~tkv:*", "+@all"]
    )
    hs = hashes("auth", 4)
    data = blocks_for(hs, MODEL)
    try:
        with make_store(server.url, namespace="auth", timeout=0.3) as anon:
            assert anon.put_blocks(hs, data) == 0  # NOAUTH: dropped writes, no exception
            assert anon.get_blocks(hs)[1] == [False] * 4
        with make_store(server.url, namespace="auth", password="s3cret") as store:
            assert store.put_blocks(hs, data) == 4
        with make_store(server.url, namespace="auth", username="alice", password="alicepw") as alice:
            out, ok = alice.get_blocks(hs)
            assert all(ok) and same(out, data)
        url = f"redis://alice:alicepw@127.0.0.1:{server.port}"
        with make_store(url, namespace="auth") as via_url:
            assert all(via_url.get_blocks(hs)[1])
    finally:
        server.close()


def test_tls_options_are_passed_to_the_connections(shared_server: RedisServer) -> None:
    with make_store(f"rediss://127.0.0.1:{shared_server.port}", ssl_ca_certs="/nonexistent/ca.pem") as store:
        node = store._router._nodes[f"127.0.0.1:{shared_server.port}"]
        assert node.pool.connection_class is redis.SSLConnection
        assert node.pool.connection_kwargs["ssl_ca_certs"] == "/nonexistent/ca.pem"
        # The server speaks no TLS: a handshake failure is a miss, not an exception.
        assert store.get_blocks(hashes("tls", 2))[1] == [False, False]
