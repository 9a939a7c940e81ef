"""Connections, routing and pipelined dispatch to one Redis server or the masters of a Redis Cluster.

Why not ``redis.cluster.RedisCluster``'s pipeline: on a connection error or timeout it re-initialises the slot
table and retries the WHOLE pipeline, then re-sends failed commands one by one through ``execute_command`` with
their own retries, node after node. A dead or stalled (SIGSTOP) node then costs many multiples of the socket
timeout and fails the keys of healthy nodes too. The remote tier's promise is the opposite: a bad node's keys
are misses after at most about one timeout, every other node's keys are served. So this module routes by
itself, reusing redis-py's connections, URL parsing, reply parser and CRC16 slot function:

* commands are grouped by the node that owns their key's slot (``CLUSTER SLOTS``), split into chunks of at
  most ``max_batch`` commands / 16 MiB, and each chunk is one pipelined round trip (all commands written, then
  all replies read); a node's chunks run one after the other, different nodes in parallel on a thread pool;
* ``-MOVED slot host:port`` updates the slot table, ``-ASK slot host:port`` resends with ``ASKING`` first, both
  retried at most twice; a MOVED also schedules a background refresh of the whole table;
* every socket operation has ``socket_timeout``/``socket_connect_timeout`` = ``timeout`` and redis-py's own
  retries are off. A node that times out or refuses is marked down for ``retry_interval`` seconds: its
  commands fail at once (no network) until then, and the first success afterwards counts as a reconnect;
* a cluster whose slot table cannot be read at construction is not an error: commands fail (misses) and a
  background refresh is attempted at most every ``retry_interval`` seconds.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

__all__ = ["Command", "Failure", "Router", "pack_command", "parse_url_option"]

logger = logging.getLogger("tiered_kv.remote")

NUM_SLOTS = 16384
_CHUNK_BYTES = 16 << 20
_SMALL = 16 << 10  # parts shorter than this are coalesced into one send buffer
_MAX_REDIRECTS = 2
_ASKING = b"*1\r\n$6\r\nASKING\r\n"


def pack_command(*args: bytes) -> bytes:
    """One RESP array of bulk strings (small commands: GET, EXISTS, DEL, CLUSTER SLOTS)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


@dataclass
class Command:
    """One keyed command, already packed (``parts`` are sent back to back; large ones without copying)."""

    key: bytes
    parts: list[bytes | memoryview]
    nbytes: int = 0

    def __post_init__(self) -> None:
        if not self.nbytes:
            self.nbytes = sum(len(p) for p in self.parts)


@dataclass
class Failure:
    """A command that got no reply.

    ``kind``: "timeout" (socket timeout), "connection" (refused/reset/TLS/AUTH), "down" (node skipped while
    marked down), "unrouted" (no known owner for the slot), "error" (an error reply other than MOVED/ASK,
    e.g. OOM, CLUSTERDOWN, TRYAGAIN).
    """

    kind: str
    message: str = ""


@dataclass
class RouterStats:
    """Counters kept by the router (read under the store's lock-free snapshot; ints only)."""

    timeouts: int = 0
    connection_errors: int = 0
    reconnects: int = 0
    redirects: int = 0
    topology_refreshes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


def parse_url_option(url: str) -> dict[str, Any]:
    """``redis://[user:pass@]host:port[/db]`` or ``rediss://...`` (TLS) or bare ``host:port`` -> options.

    Raises:
        ValueError: another scheme, or no host.
    """
    if "://" not in url:
        url = "redis://" + url
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"scheme {scheme!r} is not supported (use redis:// or rediss://)")
    opts = parse_url(url)
    if not opts.get("host"):
        raise ValueError("the URL names no host")
    opts.setdefault("port", 6379)
    opts["ssl"] = scheme == "rediss"
    opts.pop("connection_class", None)
    return opts


class Node:
    """A connection pool to one server plus its up/down state."""

    def __init__(
        self, host: str, port: int, conn_kwargs: dict[str, Any], retry_interval: float, stats: RouterStats
    ) -> None:
        self.host = host
        self.port = port
        self.name = f"{host}:{port}"
        self._stats = stats
        self._retry_interval = retry_interval
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._failed = False
        self.pool = redis.ConnectionPool(host=host, port=port, **conn_kwargs)

    def available(self) -> bool:
        """False while the node is marked down after a failure."""
        return time.monotonic() >= self._down_until

    def _mark_failed(self) -> None:
        with self._lock:
            self._failed = True
            self._down_until = time.monotonic() + self._retry_interval

    def _mark_ok(self) -> None:
        if self._failed:
            with self._lock:
                if self._failed:
                    self._failed = False
                    self._down_until = 0.0
                    self._stats.add("reconnects")
                    logger.info("remote node %s is reachable again", self.name)

    def execute(self, commands: Sequence[Command], asking: bool = False) -> list[object]:
        """One pipelined round trip: write every command, then read every reply.

        Returns one entry per command: the reply, a :class:`ResponseError` (error reply, incl. MOVED/ASK),
        or a :class:`Failure` for all of them when the connection failed or timed out (node marked down).
        """
        if not self.available():
            return [Failure("down", f"{self.name} is marked down")] * len(commands)
        out: list[bytes | memoryview] = []
        buf = bytearray()
        for cmd in commands:
            if asking:
                buf += _ASKING
            for part in cmd.parts:
                if len(part) < _SMALL:
                    buf += part
                else:
                    if buf:
                        out.append(bytes(buf))
                        buf.clear()
                    out.append(part)
        if buf:
            out.append(bytes(buf))
        conn = None
        try:
            conn = self.pool.get_connection()
            conn.send_packed_command(out, check_health=False)
            replies: list[object] = []
            for _ in commands:
                if asking:
                    with contextlib.suppress(ResponseError):  # the command's own reply says what went wrong
                        conn.read_response()
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        # The remote tier's error boundary, in one place: redis-py's exceptions (and socket errors) become
        # Failure replies, which the store counts as misses or dropped writes; nothing is raised past here.
        # Error replies (ResponseError: OOM, CLUSTERDOWN, ...) stay in the reply list, one per command.
        except (RedisTimeoutError, TimeoutError) as exc:
            # redis-py has already closed the socket, so no stale reply can reach a later caller.
            self._mark_failed()
            self._stats.add("timeouts")
            logger.debug("remote node %s timed out: %s", self.name, exc)
            return [Failure("timeout", f"{self.name}: {exc}")] * len(commands)
        except (RedisConnectionError, OSError, redis.RedisError) as exc:
            if conn is not None:
                conn.disconnect()
            self._mark_failed()
            self._stats.add("connection_errors")
            logger.debug("remote node %s failed: %s", self.name, exc)
            return [Failure("connection", f"{self.name}: {exc}")] * len(commands)
        finally:
            if conn is not None:
                self.pool.release(conn)
        self._mark_ok()
        return replies

    def close(self) -> None:
        self.pool.disconnect()


class Router:
    """Sends keyed commands to the right server(s) and collects one result per command.

    Args:
        urls: one URL (a single server) or a list (seed nodes of a Redis Cluster).
        cluster: route by cluster slot (True for a list of URLs).
        timeout: socket connect/read/write timeout in seconds.
        retry_interval: how long a failed node is skipped before it is tried again.
        max_batch: commands per pipelined round trip.
        conn_kwargs: extra connection options (auth, TLS) applied to every node.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        cluster: bool,
        timeout: float,
        retry_interval: float,
        max_batch: int,
        conn_kwargs: dict[str, Any],
    ) -> None:
        self.cluster = cluster
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.max_batch = max_batch
        self.stats = RouterStats()
        self._conn_kwargs = {
            **conn_kwargs,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        self._lock = threading.Lock()
        self._nodes: dict[str, Node] = {}
        self._seeds: list[str] = []
        for url in urls:
            opts = parse_url_option(url)
            node = self._node(str(opts["host"]), int(opts["port"]))
            self._seeds.append(node.name)
        self._slots: list[str | None] | None = None
        self._last_refresh = -float("inf")
        self._refreshing = False
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="tiered-kv-remote")
        if cluster:
            self.refresh(deadline=time.monotonic() + 2 * timeout)

    # -- topology -----------------------------------------------------------------------------------
    def _node(self, host: str, port: int) -> Node:
        name = f"{host}:{port}"
        with self._lock:
            node = self._nodes.get(name)
            if node is None:
                node = Node(host, port, self._conn_kwargs, self.retry_interval, self.stats)
                self._nodes[name] = node
            return node

    @property
    def nodes(self) -> list[str]:
        """Names (``host:port``) of every node known so far."""
        with self._lock:
            return list(self._nodes)

    def refresh(self, deadline: float) -> bool:
        """Read the slot table (``CLUSTER SLOTS``) from the first node that answers before ``deadline``."""
        self._last_refresh = time.monotonic()
        with self._lock:
            known = list(self._nodes.values())
        seeds = [n for n in known if n.name in self._seeds]
        candidates = [n for n in known if n.available()] + seeds
        tried: set[str] = set()
        for node in candidates:
            if node.name in tried or time.monotonic() >= deadline:
                continue
            tried.add(node.name)
            (reply,) = node.execute([Command(b"", [pack_command(b"CLUSTER", b"SLOTS")])])
            if isinstance(reply, list):
                table = self._parse_slots(reply, node.host)
                if table is not None:
                    self._slots = table
                    self.stats.add("topology_refreshes")
                    return True
            elif isinstance(reply, ResponseError):
                logger.warning("remote node %s refused CLUSTER SLOTS: %s", node.name, reply)
        return False

    def _parse_slots(self, reply: list[Any], default_host: str) -> list[str | None] | None:
        table: list[str | None] = [None] * NUM_SLOTS
        try:
            for entry in reply:
                start, end, master = int(entry[0]), int(entry[1]), entry[2]
                host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
                if not host or host == "?":
                    host = default_host
                node = self._node(host, int(master[1]))
                for slot in range(start, end + 1):
                    table[slot] = node.name
        except (IndexError, TypeError, ValueError, UnicodeDecodeError) as exc:
            logger.warning("malformed CLUSTER SLOTS reply: %s", exc)
            return None
        return table

    def request_refresh(self) -> None:
        """Refresh the slot table in the background (at most once per ``retry_interval``)."""
        if not self.cluster or self._closed:
            return
        with self._lock:
            if self._refreshing or time.monotonic() - self._last_refresh < self.retry_interval:
                return
            self._refreshing = True

        def run() -> None:
            try:
                self.refresh(deadline=time.monotonic() + 2 * self.timeout)
            finally:
                self._refreshing = False

        threading.Thread(target=run, name="tiered-kv-remote-refresh", daemon=True).start()

    def _owner(self, key: bytes) -> Node | None:
        if not self.cluster:
            return self._nodes[self._seeds[0]]
        slots = self._slots
        if slots is None:
            return None
        name = slots[key_slot(key)]
        if name is None:
            return None
        with self._lock:
            return self._nodes.get(name)

    # -- dispatch -----------------------------------------------------------------------------------
    def _chunks(self, idx: list[int], commands: Sequence[Command]) -> list[list[int]]:
        chunks: list[list[int]] = []
        cur: list[int] = []
        size = 0
        for i in idx:
            n = commands[i].nbytes
            if cur and (len(cur) >= self.max_batch or size + n > _CHUNK_BYTES):
                chunks.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += n
        if cur:
            chunks.append(cur)
        return chunks

    def dispatch(self, commands: Sequence[Command]) -> list[object]:
        """Run every command on its key's node; one result per command (reply, ResponseError or Failure).

        Never raises for remote failures. A sick node costs the call at most about one ``timeout`` (two if
        the connection is new: connect, then the first read); its later chunks fail at once (node down).
        """
        results: list[object] = [None] * len(commands)
        pending = list(range(len(commands)))
        redirect: dict[int, tuple[Node, bool]] = {}
        for round_ in range(_MAX_REDIRECTS + 1):
            groups: dict[str, tuple[Node, bool, list[int]]] = {}
            for i in pending:
                target = redirect.get(i)
                if target is None:
                    node = self._owner(commands[i].key)
                    if node is None:
                        results[i] = Failure("unrouted", "no node owns this key's slot (slot table unknown)")
                        self.request_refresh()
                        continue
                    target = (node, False)
                node, asking = target
                groups.setdefault(f"{node.name}/{asking}", (node, asking, []))[2].append(i)
            work = [
                (node, asking, chunk) for node, asking, idx in groups.values() for chunk in self._chunks(idx, commands)
            ]
            self._run(work, commands, results)
            pending = []
            redirect = {}
            for i, res in enumerate(results):
                if isinstance(res, (MovedError, AskError)) and round_ < _MAX_REDIRECTS:
                    self.stats.add("redirects")
                    node = self._node(res.host or "127.0.0.1", int(res.port))
                    if isinstance(res, MovedError):
                        if self._slots is not None:
                            self._slots[res.slot_id] = node.name
                        self.request_refresh()
                    redirect[i] = (node, not isinstance(res, MovedError))  # MovedError subclasses AskError
                    pending.append(i)
            if not pending:
                break
        if self.cluster and any(isinstance(r, Failure) and r.kind in ("timeout", "connection") for r in results):
            self.request_refresh()  # a failover may have moved the node's slots to a replica
        return [Failure("error", str(r)) if isinstance(r, (MovedError, AskError)) else r for r in results]

    def _run(
        self, work: list[tuple[Node, bool, list[int]]], commands: Sequence[Command], results: list[object]
    ) -> None:
        """Run each node's chunks one after the other on that node, and different nodes in parallel.

        One connection per node at a time: Redis executes one command at a time anyway, and parsing replies
        holds the GIL, so more connections to one node only add thread switches. After a chunk times out
        the node is marked down and its remaining chunks fail at once, so a stalled node costs one timeout.
        """

        def one(node: Node, asking: bool, chunks: list[list[int]]) -> None:
            for chunk in chunks:
                replies = node.execute([commands[i] for i in chunk], asking)
                for i, reply in zip(chunk, replies, strict=True):
                    results[i] = reply

        by_node: dict[tuple[str, bool], tuple[Node, bool, list[list[int]]]] = {}
        for node, asking, chunk in work:
            by_node.setdefault((node.name, asking), (node, asking, []))[2].append(chunk)
        tasks = list(by_node.values())
        if len(tasks) == 1:
            one(*tasks[0])
            return
        futures = [self._pool.submit(one, *t) for t in tasks]
        for fut in futures:
            fut.result()

    def close(self) -> None:
        """Close every connection and stop the worker threads (in-flight work ends within a timeout)."""
        self._closed = True
        self._pool.shutdown(wait=True)
        with self._lock:
            nodes = list(self._nodes.values())
        for node in nodes:
            node.close()
