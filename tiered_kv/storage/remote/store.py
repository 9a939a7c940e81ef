"""RemoteStore: KV blocks as Redis string values, on one server or a Redis Cluster. No eviction policy.

Redis decides what stays (``maxmemory`` + ``allkeys-lru``/``allkeys-lfu``); this module owns the key scheme,
the value format (header + checksum, see :mod:`._format`), batching and failure handling. Remote failures
never raise: a read that cannot be served or verified is a miss, a write that cannot be done is dropped,
and both are counted in :meth:`RemoteStore.metrics`. Only caller mistakes (bad hashes, wrong tensor shape,
use after :meth:`RemoteStore.close`) raise :class:`RemoteTierError`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...config import HASH_ALGORITHMS, ModelConfig
from ...errors import ConfigError, RemoteTierError
from ...hashing import check_hash
from ...metrics import RecentLatencies
from ._cluster import Command, Failure, Router, pack_command, parse_url_option
from ._format import (
    HASH_ALGORITHM_IDS,
    Verdict,
    identity_digest,
    key_prefix,
    pack_header,
    payload_offset,
    value_tokens,
    verify_value,
)

__all__ = ["RemoteStore", "RemoteTierError"]  # RemoteTierError: defined in tiered_kv.errors, importable from here

logger = logging.getLogger("tiered_kv.remote")

_LATENCY_SAMPLES = 4096
_INLINE_PAYLOAD = 16 << 10  # smaller payloads are copied into the command buffer instead of sent separately


class RemoteStore:
    """KV blocks on Redis: pipelined, checksum-verified, bounded by timeouts.

    Args:
        urls: ``"redis://[user:pass@]host:port[/db]"`` (``rediss://`` for TLS) for one server, or a list of such
            URLs: seed nodes of a Redis Cluster (one is enough; the others are found through ``CLUSTER SLOTS``).
        model: block geometry and dtype; its fingerprint is part of every key and every value header.
        namespace: model name/revision or tenant; part of every key and header (namespaces never see each
            other's blocks).
        hash_algorithm: "sha256" (32-byte hashes) or "xxh3_128" (16-byte hashes).
        timeout: socket connect/read/write timeout in seconds. A dead or stalled node costs a call at most
            about this long (2x in the worst case); afterwards the node is skipped for ``retry_interval``.
        password: AUTH password (overrides one in the URL).
        username: ACL user name (overrides one in the URL).
        ssl: use TLS (also implied by ``rediss://``).
        ssl_ca_certs: CA bundle to verify the server certificate with (TLS only).
        max_batch: commands per pipelined round trip (chunks also stop at 16 MiB).
        retry_interval: seconds a failed node is skipped (its keys are misses) before it is tried again.
        cluster: route by Redis Cluster slot; default: True when ``urls`` is a list, False for one string.

    Raises:
        ConfigError: a bad URL or option. An unreachable server is NOT an error: the store starts, counts
            misses and dropped writes, and connects once the server is up.

    Thread safety: every method may be called from several threads at once.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        model: ModelConfig,
        namespace: str,
        hash_algorithm: str,
        timeout: float = 0.5,
        password: str | None = None,
        username: str | None = None,
        ssl: bool = False,
        ssl_ca_certs: str | None = None,
        max_batch: int = 64,
        retry_interval: float = 1.0,
        cluster: bool | None = None,
    ) -> None:
        if not isinstance(model, ModelConfig):
            raise ConfigError("model", model, "must be a ModelConfig")
        if hash_algorithm not in HASH_ALGORITHMS:
            raise ConfigError("hash_algorithm", hash_algorithm, f"must be one of {', '.join(HASH_ALGORITHMS)}")
        if not isinstance(namespace, str) or not namespace:
            raise ConfigError("namespace", namespace, "must be a non-empty str")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError("timeout", timeout, "must be a number of seconds > 0")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch <= 0:
            raise ConfigError("max_batch", max_batch, "must be an int > 0")
        if isinstance(retry_interval, bool) or not isinstance(retry_interval, (int, float)) or retry_interval < 0:
            raise ConfigError("retry_interval", retry_interval, "must be a number of seconds >= 0")
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list or not all(isinstance(u, str) and u for u in url_list):
            raise ConfigError("url", urls, "must be a URL string or a non-empty list of them")
        try:
            parsed = [parse_url_option(u) for u in url_list]
        except ValueError as exc:
            raise ConfigError("url", urls, str(exc)) from exc
        use_cluster = not isinstance(urls, str) if cluster is None else bool(cluster)
        if not use_cluster and len(url_list) != 1:
            raise ConfigError("url", urls, "a single server takes one URL (a list means a Redis Cluster)")
        use_ssl = ssl or any(p["ssl"] for p in parsed)
        if ssl_ca_certs is not None and not use_ssl:
            raise ConfigError("ssl_ca_certs", ssl_ca_certs, "only meaningful with ssl=True or rediss://")

        first = parsed[0]
        conn_kwargs: dict[str, Any] = {
            "username": username if username is not None else first.get("username"),
            "password": password if password is not None else first.get("password"),
            "db": int(first.get("db", 0) or 0),
        }
        if use_cluster and conn_kwargs["db"] != 0:
            raise ConfigError("url", urls, "Redis Cluster has only database 0")
        if use_ssl:
            import redis  # the TLS connection class lives in redis-py

            conn_kwargs["connection_class"] = redis.SSLConnection
            if ssl_ca_certs is not None:
                conn_kwargs["ssl_ca_certs"] = ssl_ca_certs

        self.model = model
        self.namespace = namespace
        self.hash_algorithm = hash_algorithm
        self.timeout = float(timeout)
        self.max_batch = max_batch
        self.cluster = use_cluster
        self.block_size = model.block_size_bytes
        self.fingerprint = model.fingerprint()
        self._identity = identity_digest(self.fingerprint, namespace, hash_algorithm)
        self._algo_id = HASH_ALGORITHM_IDS[hash_algorithm]
        self._prefix = key_prefix(namespace, self.fingerprint)
        self._lock = threading.Lock()
        self._closed = False
        self._counts = dict.fromkeys(
            (
                "gets",
                "hits",
                "misses",
                "puts",
                "put_failures",
                "corrupt",
                "bytes_in",
                "bytes_out",
                "deletes",
                "exists_calls",
                "errors",
                "unavailable",
            ),
            0,
        )
        self._get_lat = RecentLatencies(_LATENCY_SAMPLES)
        self._put_lat = RecentLatencies(_LATENCY_SAMPLES)
        self._router = Router(
            url_list,
            cluster=use_cluster,
            timeout=self.timeout,
            retry_interval=float(retry_interval),
            max_batch=max_batch,
            conn_kwargs=conn_kwargs,
        )

    # -- helpers ------------------------------------------------------------------------------------
    def key(self, sequence_hash: bytes) -> bytes:
        """The Redis key of a block: ``tkv:<namespace>:<fingerprint>:<hash hex>``."""
        return self._prefix + sequence_hash.hex().encode()

    def _check_open(self) -> None:
        if self._closed:
            raise RemoteTierError("the remote store is closed")

    def _keys(self, hashes: Sequence[bytes]) -> list[bytes]:
        what = f"{self.hash_algorithm} sequence hash"
        try:
            return [self.key(check_hash(h, self.hash_algorithm, what)) for h in hashes]
        except ValueError as exc:
            raise RemoteTierError(str(exc)) from None

    def _check_tensor(self, t: torch.Tensor, n: int, what: str) -> None:
        shape = (n, *self.model.block_shape)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != self.model.torch_dtype:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise RemoteTierError(f"{what} must be {self.model.dtype} shaped {list(shape)}, got {got}")

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                self._counts[name] += n

    def _tally_failure(self, res: object) -> None:
        if isinstance(res, Failure):
            if res.kind in ("down", "unrouted"):
                self._count(unavailable=1)
            elif res.kind == "error":
                self._count(errors=1)
        elif isinstance(res, Exception):
            self._count(errors=1)

    # -- writes -------------------------------------------------------------------------------------
    def put_blocks(
        self, hashes: Sequence[bytes], data: torch.Tensor, tokens: Sequence[bytes | None] | None = None
    ) -> int:
        """Store ``data[i]`` under ``hashes[i]`` (pipelined SETs, grouped by node); overwrite what is there.

        Args:
            hashes: sequence hashes of the blocks.
            data: ``[n, num_layers, outer_dim, page_size, inner_dim]`` in the model dtype (CPU or CUDA).
            tokens: optionally each block's token ids as uint32 bytes (``tiered_kv.tokens.encode_tokens``), stored
                with it so that a reader can tell a hash collision from a hit; None entries store none.

        Returns:
            How many blocks were written. Blocks not written (node down or slow, OOM under ``noeviction``...)
            are counted in ``put_failures``; nothing is raised for them.

        Raises:
            RemoteTierError: bad hashes or tensor, or the store is closed.
        """
        self._check_open()
        n = len(hashes)
        self._check_tensor(data, n, "data")
        keys = self._keys(hashes)
        if tokens is not None and len(tokens) != n:
            raise RemoteTierError(f"tokens: expected one entry per block ({n}), got {len(tokens)}")
        if n == 0:
            return 0
        start = time.perf_counter()
        host = data.detach()
        if host.device.type != "cpu":
            host = host.cpu()
        flat = host.contiguous().view(torch.uint8).reshape(n, self.block_size).numpy()
        commands = []
        for i, key in enumerate(keys):
            payload = memoryview(flat[i])
            toks = (tokens[i] if tokens is not None else None) or b""
            header = pack_header(self._identity, self._algo_id, bytes(hashes[i]), payload, toks) + toks
            head = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, len(header) + self.block_size)
            if self.block_size < _INLINE_PAYLOAD:
                parts: list[bytes | memoryview] = [head + header + payload.tobytes() + b"\r\n"]
            else:
                parts = [head + header, payload, b"\r\n"]
            commands.append(Command(key, parts, len(head) + len(header) + self.block_size + 2))
        results = self._router.dispatch(commands)
        written = 0
        for res in results:
            if res == b"OK" or res == "OK":
                written += 1
            else:
                self._tally_failure(res)
        elapsed = time.perf_counter() - start
        with self._lock:
            self._counts["puts"] += written
            self._counts["put_failures"] += n - written
            self._counts["bytes_out"] += written * self.block_size
            self._put_lat.observe(elapsed)
        return written

    def delete(self, hashes: Sequence[bytes]) -> None:
        """Delete the blocks of ``hashes`` (best effort: failures are counted, not raised)."""
        self._check_open()
        keys = self._keys(hashes)
        if not keys:
            return
        results = self._router.dispatch([Command(k, [pack_command(b"DEL", k)]) for k in keys])
        done = 0
        for res in results:
            if isinstance(res, int):
                done += 1
            else:
                self._tally_failure(res)
        self._count(deletes=done)

    # -- reads --------------------------------------------------------------------------------------
    def get_blocks(self, hashes: Sequence[bytes], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[bool]]:
        """Read the blocks of ``hashes``; see :meth:`get_blocks_with_tokens` (which also returns their token ids)."""
        data, ok, _ = self.get_blocks_with_tokens(hashes, out)
        return data, ok

    def get_blocks_with_tokens(
        self, hashes: Sequence[bytes], out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[bool], list[bytes | None]]:
        """Read the blocks of ``hashes`` (pipelined GETs) and verify each value's header and checksum.

        Args:
            hashes: sequence hashes to read.
            out: optional destination ``[n, L, O, P, I]`` CPU tensor in the model dtype, contiguous.

        Returns:
            ``(blocks, ok, tokens)``: ``ok[i]`` is True when ``blocks[i]`` holds the verified bytes of ``hashes[i]``;
            ``tokens[i]`` the token ids stored with it (None when not stored, or not ok).
            Rows with ``ok[i]`` False (missing, unreachable, timed out, bad header, other fingerprint or
            namespace, bad checksum) hold undefined data. Values that failed verification are counted in
            ``corrupt`` and deleted from Redis, best effort.

        Raises:
            RemoteTierError: bad hashes or ``out``, or the store is closed.
        """
        self._check_open()
        n = len(hashes)
        keys = self._keys(hashes)
        if out is None:
            out = torch.empty((n, *self.model.block_shape), dtype=self.model.torch_dtype)
        else:
            self._check_tensor(out, n, "out")
            if out.device.type != "cpu" or not out.is_contiguous():
                raise RemoteTierError("out must be a contiguous CPU tensor")
        if n == 0:
            return out, [], []
        start = time.perf_counter()
        results = self._router.dispatch([Command(k, [pack_command(b"GET", k)]) for k in keys])
        dest = out.view(torch.uint8).reshape(n, self.block_size).numpy()
        ok = [False] * n
        toks: list[bytes | None] = [None] * n
        corrupt: list[int] = []
        for i, value in enumerate(results):
            if isinstance(value, (Failure, Exception)):
                self._tally_failure(value)
                continue
            verdict, why = verify_value(value, self._identity, self._algo_id, bytes(hashes[i]), self.block_size)
            if verdict is Verdict.OK:
                assert isinstance(value, (bytes, bytearray))
                dest[i] = np.frombuffer(value, dtype=np.uint8, count=self.block_size, offset=payload_offset(value))
                toks[i] = value_tokens(value)
                ok[i] = True
            elif verdict is Verdict.CORRUPT:
                logger.warning("remote block %s failed verification (%s); treated as a miss", keys[i].decode(), why)
                corrupt.append(i)
        hits = sum(ok)
        elapsed = time.perf_counter() - start
        with self._lock:
            self._counts["gets"] += n
            self._counts["hits"] += hits
            self._counts["misses"] += n - hits
            self._counts["corrupt"] += len(corrupt)
            self._counts["bytes_in"] += hits * self.block_size
            self._get_lat.observe(elapsed)
        if corrupt:
            # A corrupt value would fail every later read too; dropping it lets a good copy be written again.
            self._router.dispatch([Command(keys[i], [pack_command(b"DEL", keys[i])]) for i in corrupt])
        return out, ok, toks

    def exists(self, hashes: Sequence[bytes]) -> list[bool]:
        """Whether each block is present remotely (pipelined EXISTS; unreachable -> False).

        Presence is not verification: a present value can still fail its checksum in :meth:`get_blocks`.
        """
        self._check_open()
        keys = self._keys(hashes)
        if not keys:
            return []
        results = self._router.dispatch([Command(k, [pack_command(b"EXISTS", k)]) for k in keys])
        found = []
        for res in results:
            if isinstance(res, int):
                found.append(res > 0)
            else:
                self._tally_failure(res)
                found.append(False)
        self._count(exists_calls=1)
        return found

    # -- state --------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """Counters since construction.

        Keys: ``gets, hits, misses, hit_rate, puts, put_failures, timeouts, corrupt, bytes_in, bytes_out,
        reconnects, deletes, exists_calls, errors`` (error replies such as OOM or CLUSTERDOWN),
        ``unavailable`` (commands failed fast: node marked down, slot owner unknown),
        ``connection_errors, redirects`` (MOVED/ASK followed), ``topology_refreshes``, ``nodes``,
        ``get_latency_p50_ms, get_latency_p99_ms, put_latency_p50_ms, put_latency_p99_ms`` and
        ``latency_p50_ms, latency_p99_ms`` (of get_blocks calls; last 4096 calls).
        """
        stats = self._router.stats
        with self._lock:
            m: dict[str, Any] = dict(self._counts)
        with stats.lock:
            m.update(
                timeouts=stats.timeouts,
                connection_errors=stats.connection_errors,
                reconnects=stats.reconnects,
                redirects=stats.redirects,
                topology_refreshes=stats.topology_refreshes,
            )
        m["hit_rate"] = m["hits"] / m["gets"] if m["gets"] else 0.0
        m["nodes"] = len(self._router.nodes)
        for name, latencies in (("get", self._get_lat), ("put", self._put_lat)):
            p50, p99 = latencies.percentiles(50, 99)
            m[f"{name}_latency_p50_ms"] = p50 * 1e3
            m[f"{name}_latency_p99_ms"] = p99 * 1e3
        m["latency_p50_ms"] = m["get_latency_p50_ms"]
        m["latency_p99_ms"] = m["get_latency_p99_ms"]
        return m

    def close(self) -> None:
        """Close every connection (idempotent). Later data calls raise :class:`RemoteTierError`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._router.close()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "cluster" if self.cluster else "single"
        return f"RemoteStore({mode}, nodes={self._router.nodes}, namespace={self.namespace!r}, fp={self.fingerprint})"
