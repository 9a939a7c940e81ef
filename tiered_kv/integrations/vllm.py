"""vLLM (0.33) KV offloading: tiered_kv's disk tier (and optionally its Redis tier) as a secondary tier.

vLLM's ``TieringOffloadingSpec`` keeps a CPU primary tier (one ``memoryview`` row per chunk) and cascades every
chunk stored there to its secondary tiers; a chunk found only in a secondary tier is promoted back into a primary
row. :class:`TieredKvTier` is such a secondary tier, loaded by vLLM from ``--kv-transfer-config`` with no fork::

    {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
     "kv_connector_extra_config": {"spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 10737418240,
       "secondary_tiers": [{"type": "TieredKvTier", "module_path": "tiered_kv.integrations.vllm",
                            "path": "/nvme/kv", "num_blocks": 500000}]}}

How vLLM's objects map onto tiered_kv's:

* One chunk (a primary row of ``primary_kv_view.strides[0]`` bytes, opaque to us) is one tiered_kv block of a
  ``ModelConfig(num_layers=1, outer_dim=1, page_size=16, inner_dim=chunk_bytes // 16, dtype="uint8")``.
* A vLLM ``OffloadKey`` (block hash + 4-byte group index; its length depends on vLLM's prefix-caching hash) becomes
  the 32-byte sequence hash ``sha256(key)`` (``hash_algorithm="sha256"``). The key itself is stored with the block
  in its registry row (the 64 bytes of "token ids" a 16-token page carries: a length byte, the key, zero padding),
  so a load verifies it (even a SHA-256 collision is a miss, never someone else's chunk) and a restarted process
  can name the keys of the blocks it evicts. Keys longer than 63 bytes are stored without it.
* The tier's namespace is derived from the vLLM config (model name, KV dtype, KV cache layout, tokens per hash,
  blocks per chunk, KV cache groups, TP/PP/PCP/DCP rank and size, chunk size) and recorded on disk; a tier opened
  by another model or layout raises :class:`~tiered_kv.errors.LayoutMismatchError` naming the differing fields,
  and nothing on disk changes. ``PATH/vllm-config.json`` holds the fields in readable form.
* Every chunk is checksummed when stored and verified when loaded. A chunk that fails is reported as a failed key
  of its load job (``JobResult.successful_keys`` names the others), removed from the tier, and counted; its bytes
  never reach the primary tier (loads land in a staging buffer and only verified chunks are copied up).
* The disk tier is bounded (``num_blocks`` or ``bytes``); storing into a full tier evicts its coldest chunks (ARC)
  and, with KV events on, reports them as removal events.

``submit_store``/``submit_load`` only queue work: the copies run on the tier's own worker threads (``write_threads``
for stores, ``read_threads`` for loads and Redis look-ups) and are reported by ``get_finished_jobs``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

try:
    from vllm.v1.kv_offload.base import (
        ConfigInfoMapping,
        Locality,
        LookupResult,
        Medium,
        OffloadingCounterMetadata,
        OffloadingEvent,
        OffloadingGaugeMetadata,
        OffloadingMetricMetadata,
        OffloadKey,
        ReqContext,
        RequestOffloadingContext,
    )
    from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob
except ImportError as exc:  # pragma: no cover - exercised only without vLLM
    raise ImportError(
        "tiered_kv.integrations.vllm needs vLLM 0.33's KV offloading modules; on a CPU machine run "
        "tools/install_vllm.sh (see the README's 'Use with vLLM')"
    ) from exc

from ..config import DURABILITIES, DiskConfig, KvBlockManagerConfig, ModelConfig, RemoteConfig
from ..errors import ConfigError, DiskTierError, LayoutMismatchError, TieredKvError, TierLockedError
from ..events import KvEvent
from ..manager import KvBlockManager

if TYPE_CHECKING:
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadingConnectorStats
    from vllm.v1.kv_offload.base import OffloadingSpec
    from vllm.v1.kv_offload.tiering.backpressure import BackpressureDetector

__all__ = ["TieredKvTier", "chunk_model", "sequence_hash_of", "vllm_namespace_fields"]

log = logging.getLogger("tiered_kv.vllm")

#: Tokens per tiered_kv page: a page carries 4 * 16 = 64 bytes of "token ids", where the vLLM key is kept.
_PAGE = 16
_KEY_ROOM = 4 * _PAGE
_CONFIG_FILE = "vllm-config.json"
#: Largest load batch staged at once (bytes); bigger jobs are read in several rounds.
_STAGE_BYTES = 64 << 20
_ALIGN = 4096


class _Metric:
    """Prometheus names of the tier's own metrics (vLLM adds the ``vllm:`` ones of the tiering manager)."""

    LOOKUP_HITS = "vllm:kv_offload_tiered_kv_lookup_hits"
    LOOKUP_MISSES = "vllm:kv_offload_tiered_kv_lookup_misses"
    STORED_BYTES = "vllm:kv_offload_tiered_kv_stored_bytes"
    LOADED_BYTES = "vllm:kv_offload_tiered_kv_loaded_bytes"
    STORE_FAILED_CHUNKS = "vllm:kv_offload_tiered_kv_store_failed_chunks"
    LOAD_FAILED_CHUNKS = "vllm:kv_offload_tiered_kv_load_failed_chunks"
    CORRUPT_CHUNKS = "vllm:kv_offload_tiered_kv_corrupt_chunks"
    EVICTED_CHUNKS = "vllm:kv_offload_tiered_kv_evicted_chunks"
    REMOTE_HITS = "vllm:kv_offload_tiered_kv_remote_hits"
    USED_CHUNKS = "vllm:kv_offload_tiered_kv_used_chunks"
    CAPACITY_CHUNKS = "vllm:kv_offload_tiered_kv_capacity_chunks"


_COUNTERS = {
    _Metric.LOOKUP_HITS: "Chunk lookups answered HIT by the tiered_kv tier.",
    _Metric.LOOKUP_MISSES: "Chunk lookups answered MISS by the tiered_kv tier.",
    _Metric.STORED_BYTES: "Bytes of chunks written to the tiered_kv tier (checksummed).",
    _Metric.LOADED_BYTES: "Bytes of verified chunks loaded from the tiered_kv tier into the primary tier.",
    _Metric.STORE_FAILED_CHUNKS: "Chunks a store job could not write to the tiered_kv tier.",
    _Metric.LOAD_FAILED_CHUNKS: "Chunks a load job could not deliver (missing, unreadable or corrupt).",
    _Metric.CORRUPT_CHUNKS: "Chunks that failed their checksum on load; each was removed from the tier.",
    _Metric.EVICTED_CHUNKS: "Chunks evicted from the tiered_kv tier to make room (capacity).",
    _Metric.REMOTE_HITS: "Chunks missing locally that were fetched from the shared Redis tier.",
}
_GAUGES = {
    _Metric.USED_CHUNKS: "Chunks held by the tiered_kv tier.",
    _Metric.CAPACITY_CHUNKS: "Capacity of the tiered_kv tier, in chunks.",
}


@dataclass(frozen=True)
class _Info:
    """The tier's labels on vllm:kv_offload_config_info (fixed for the process lifetime)."""

    tiered_kv_path: str
    tiered_kv_capacity_chunks: int
    tiered_kv_durability: str
    tiered_kv_remote: bool

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(cls.__dataclass_fields__)


# ------------------------------------------------------------------------------------------------ mapping helpers
def sequence_hash_of(key: bytes) -> bytes:
    """The tiered_kv sequence hash (32 bytes, sha256) under which a vLLM ``OffloadKey`` is stored."""
    return hashlib.sha256(key).digest()


def _key_record(key: bytes) -> bytes | None:
    """The key as the 64 bytes stored in the block's row: a length byte, the key, zero padding."""
    n = len(key)
    if n >= _KEY_ROOM:
        return None
    return bytes((n,)) + key + bytes(_KEY_ROOM - 1 - n)


def _key_from_record(record: bytes | None) -> bytes | None:
    if record is None or len(record) != _KEY_ROOM or record[0] >= _KEY_ROOM:
        return None
    return record[1 : 1 + record[0]]


def chunk_model(chunk_bytes: int) -> ModelConfig:
    """The tiered_kv block geometry of one vLLM chunk of ``chunk_bytes`` opaque bytes."""
    if chunk_bytes <= 0 or chunk_bytes % _PAGE:
        raise ValueError(f"primary_kv_view: a chunk of {chunk_bytes} bytes is not a positive multiple of {_PAGE}")
    return ModelConfig(num_layers=1, outer_dim=1, page_size=_PAGE, inner_dim=chunk_bytes // _PAGE, dtype="uint8")


def vllm_namespace_fields(spec: OffloadingSpec, chunk_bytes: int) -> dict[str, Any]:
    """What makes two engines' chunks interchangeable: the fields the tier's namespace is derived from."""
    cfg = spec.config
    par = cfg.parallel
    return {
        "engine": "vllm",
        "model": cfg.model.name,
        "kv_dtype": str(cfg.model.dtype),
        "kv_cache_layout": cfg.kv_cache_layout,
        "canonical_layout": bool(cfg.canonical_layout),
        "replicated_layout": bool(cfg.replicated_layout),
        "tokens_per_hash": cfg.cache.tokens_per_hash,
        "blocks_per_chunk": cfg.cache.blocks_per_chunk,
        "kv_cache_groups": [[g.tokens_per_block, list(g.layer_names)] for g in cfg.groups],
        "rank": par.rank,
        "world_size": par.world_size,
        "tp_size": par.tp_size,
        "pp_size": par.pp_size,
        "pcp_size": par.pcp_size,
        "dcp_size": par.dcp_size,
        "chunk_bytes": chunk_bytes,
    }


def _namespace(fields: dict[str, Any]) -> str:
    doc = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return f"vllm:{fields['model']}:{hashlib.sha256(doc.encode()).hexdigest()[:24]}"


# ------------------------------------------------------------------------------------------------ config parsing
def _bad(key: str, value: object, why: str) -> ConfigError:
    return ConfigError(key, value, f"TieredKvTier config: {why}")


def _int_key(key: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(key, value, f"must be an int >= {minimum}")
    return value


def _opt_seconds(key: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise _bad(key, value, "must be a positive number of seconds, or null")
    return float(value)


@dataclass
class _StoreJob:
    job_id: int
    keys: list[OffloadKey]
    hashes: list[bytes]
    chunk_ids: list[int]


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    stored_bytes: int = 0
    loaded_bytes: int = 0
    store_failed: int = 0
    load_failed: int = 0
    remote_hits: int = 0


class TieredKvTier(SecondaryTierManager):
    """A vLLM secondary tier backed by tiered_kv's disk tier (slab files, LMDB registry, checksums, ARC).

    Constructed by vLLM's ``SecondaryTierFactory`` from one ``secondary_tiers`` entry; every key of that entry other
    than ``type``/``module_path``/``backpressure`` arrives here as a keyword argument.

    Args:
        offloading_spec: vLLM's offloading spec (its config names the model and layout).
        primary_kv_view: the primary tier's ``memoryview``, one row per chunk.
        tier_type: the tier's type name (set by the factory).
        path: directory of the disk tier (created if missing). One process at a time.
        num_blocks: capacity in chunks. Give this or ``bytes``.
        bytes: capacity in bytes (rounded down to whole chunks). Give this or ``num_blocks``.
        durability: "sync", "batch" (default: synced at least every second) or "none"; see ``DiskConfig``.
        writeback: ``DiskConfig.writeback_s`` (seconds, or null). The tier has no memory tier of its own above
            the disk (vLLM's primary tier plays that role), so chunks are written as they arrive either way.
        remote_url: "redis://host:port" or a list of Redis Cluster node URLs: a shared tier behind the disk. Chunks
            stored here are also written there in the background; a chunk missing locally is looked up there
            (``lookup`` answers RETRY meanwhile) and, when found and verified, fetched into the local disk tier.
        remote_mode: "write_through" (default) or "write_back" (only chunks evicted from the disk go to Redis).
        remote_timeout: seconds after which a Redis operation counts as failed (a miss).
        read_threads: worker threads for loads and Redis look-ups (default 4).
        write_threads: worker threads for stores (default 4).
        enable_kv_events: emit ``OffloadingEvent``s (stored and removed chunks) when vLLM's KV events are on.
        locality: "LOCAL" or "REMOTE": this tier's storage relative to the engine (KV event metadata).
        backpressure_detector: vLLM's optional back-pressure detector (set by the factory).

    Raises:
        ConfigError: a bad config value (a ``ValueError`` naming the key), or an unknown key.
        LayoutMismatchError: ``path`` holds a tier made by another model or layout; nothing was changed.
        DiskTierError: ``path`` is open in another process (or already in this one), or cannot be opened.
    """

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(
        self,
        offloading_spec: OffloadingSpec,
        primary_kv_view: memoryview,
        tier_type: str,
        path: str | None = None,
        num_blocks: int | None = None,
        durability: str = "batch",
        writeback: float | None = 5.0,
        remote_url: str | list[str] | None = None,
        remote_mode: str = "write_through",
        remote_timeout: float = 0.5,
        read_threads: int = 4,
        write_threads: int = 4,
        enable_kv_events: bool = False,
        locality: str | None = None,
        backpressure_detector: BackpressureDetector | None = None,
        **options: Any,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        capacity_bytes = options.pop("bytes", None)  # a keyword argument: the name would shadow the builtin
        for key, value in options.items():
            raise _bad(key, value, f"unknown key; known keys: {', '.join(_KNOWN_KEYS)}")
        chunk = self.block_size_bytes
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise _bad("path", path, "must be a non-empty directory path")
        if (num_blocks is None) == (capacity_bytes is None):
            raise _bad("num_blocks", num_blocks, "give exactly one of num_blocks and bytes")
        if num_blocks is not None:
            capacity = _int_key("num_blocks", num_blocks)
        else:
            total = _int_key("bytes", capacity_bytes)
            capacity = total // chunk
            if capacity < 1:
                raise _bad("bytes", capacity_bytes, f"holds no chunk of {chunk} bytes")
        if durability not in DURABILITIES:
            raise _bad("durability", durability, f"must be one of {', '.join(DURABILITIES)}")
        writeback_s = _opt_seconds("writeback", writeback)
        read_n = _int_key("read_threads", read_threads)
        write_n = _int_key("write_threads", write_threads)
        if not isinstance(enable_kv_events, bool):
            raise _bad("enable_kv_events", enable_kv_events, "must be true or false")
        try:
            self.locality = Locality(locality) if locality is not None else None
        except ValueError as exc:
            raise _bad("locality", locality, "must be LOCAL or REMOTE") from exc
        remote: RemoteConfig | None = None
        if remote_url is not None:
            url = list(remote_url) if isinstance(remote_url, (list, tuple)) else remote_url
            try:
                remote = RemoteConfig(url=url, mode=remote_mode, timeout=remote_timeout)
            except ConfigError as exc:
                name = {"url": "remote_url", "mode": "remote_mode", "timeout": "remote_timeout"}.get(exc.field)
                raise _bad(name or "remote_url", exc.value, exc.reason) from exc

        self.path = os.path.abspath(os.fspath(path))
        self.num_blocks = capacity
        self.durability = durability
        self._chunk = chunk
        self._model = chunk_model(chunk)
        self._fields = vllm_namespace_fields(offloading_spec, chunk)
        self.namespace = _namespace(self._fields)
        self._info = _Info(self.path, capacity, durability, remote is not None)

        events_on = enable_kv_events and bool(
            getattr(getattr(offloading_spec, "kv_events_config", None), "enable_kv_cache_events", False)
        )
        if enable_kv_events and not events_on:
            log.warning("enable_kv_events is set on tier %r but vLLM's KV cache events are off: no events", tier_type)

        config = KvBlockManagerConfig(
            model=self._model,
            disk=DiskConfig(path=self.path, num_blocks=capacity, durability=durability, writeback_s=writeback_s),
            hash_algorithm="sha256",
            namespace=self.namespace,
            device_type="cpu",
            remote=remote,
        )
        self._bm = self._open(config)
        pool = self._bm.disk()
        assert pool is not None
        self._pool = pool
        try:
            self._write_config_record()
            # The primary rows as one uint8 tensor, sharing the memory (no copy); released again in shutdown().
            flat = primary_kv_view.cast("B") if primary_kv_view.ndim != 1 else primary_kv_view
            self._flat: memoryview | None = flat
            self._rows: torch.Tensor | None = torch.frombuffer(flat, dtype=torch.uint8).view(-1, chunk)
        except BaseException:
            self._bm.close()  # do not keep the writer lock of a tier that failed to come up
            raise
        self._num_chunks = self._rows.shape[0]

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._outstanding = 0
        self._stopping = False
        self._closed = False
        self._finished: deque[JobResult] = deque()
        self._store_queue: deque[_StoreJob] = deque()
        self._storing: dict[bytes, int] = {}  # seq hash -> in-flight store jobs holding it
        self._probing: set[bytes] = set()  # seq hashes being looked up in Redis
        self._remote_misses: dict[str, set[bytes]] = {}  # per request: seq hashes Redis does not have
        self._counters = _Counters()
        self._seen_evictions = pool.metrics.evictions
        self._seen_corrupt = pool.metrics.corrupt
        self._local = threading.local()

        self._events: deque[OffloadingEvent] | None = deque() if events_on else None
        self._key_of: dict[bytes, OffloadKey] = {}
        self._sync_asked = 0  # event-bus round trips asked for / delivered (see _sync_events)
        self._sync_done = 0
        self._synced = threading.Condition(threading.Lock())
        self._unsubscribe: Any = None
        if self._events is not None:
            storage = pool.storage
            for h, _slot, record in storage.stored_slots():  # type: ignore[attr-defined]
                known = _key_from_record(record)
                if known is not None:
                    self._key_of[h] = OffloadKey(known)
            self._unsubscribe = self._bm.subscribe(self._on_kv_event)

        self._readers = ThreadPoolExecutor(read_n, thread_name_prefix="tiered-kv-vllm-read")
        self._writers = ThreadPoolExecutor(write_n, thread_name_prefix="tiered-kv-vllm-write")
        log.info(
            "TieredKvTier %s: %d/%d chunks of %d bytes, durability %s%s",
            self.path,
            len(pool),
            capacity,
            chunk,
            durability,
            f", remote {remote.url}" if remote is not None else "",
        )

    # ------------------------------------------------------------------------------------------------ opening
    def _open(self, config: KvBlockManagerConfig) -> KvBlockManager:
        try:
            return KvBlockManager(config)
        except LayoutMismatchError as exc:
            raise LayoutMismatchError(self._mismatch_message(exc)) from exc
        except DiskTierError as exc:
            if isinstance(exc, TierLockedError):
                raise DiskTierError(
                    f"TieredKvTier: path {self.path} is in use: {exc}. Each vLLM instance needs its own path; "
                    "share chunks across instances with remote_url"
                ) from exc
            raise DiskTierError(f"TieredKvTier: cannot open the disk tier at {self.path}: {exc}") from exc

    def _mismatch_message(self, exc: LayoutMismatchError) -> str:
        theirs: dict[str, Any] = {}
        try:
            with open(os.path.join(self.path, _CONFIG_FILE), encoding="utf-8") as f:
                theirs = json.load(f)
        except (OSError, ValueError):
            pass
        diffs = [
            f"{k}: {theirs.get(k)!r} (tier) != {v!r} (this engine)"
            for k, v in self._fields.items()
            if theirs.get(k) != v
        ]
        what = "; ".join(diffs) if diffs else str(exc)
        return (
            f"TieredKvTier: the tier at {self.path} holds chunks of another model or KV layout ({what}); "
            "nothing was changed. Use another path for this engine"
        )

    def _write_config_record(self) -> None:
        """``PATH/vllm-config.json``: the namespace's fields, readable (and diffed in a mismatch error)."""
        target = os.path.join(self.path, _CONFIG_FILE)
        if os.path.exists(target):
            return
        tmp = f"{target}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({**self._fields, "namespace": self.namespace}, f, indent=2, sort_keys=True)
            os.replace(tmp, target)
        except OSError as exc:  # informational only: the namespace check itself lives in the registry
            log.warning("could not write %s: %s", target, exc)

    # ------------------------------------------------------------------------------------------------ config
    @classmethod
    def config_info_keys(cls, tier_config: dict[str, Any]) -> tuple[str, ...]:
        return _Info.names()

    def config_info(self) -> ConfigInfoMapping:
        info = self._info
        return {k: getattr(info, k) for k in _Info.names()}

    @classmethod
    def build_metric_definitions(cls, extra_config: dict[str, Any]) -> dict[str, OffloadingMetricMetadata]:
        out: dict[str, OffloadingMetricMetadata] = {
            name: OffloadingCounterMetadata(documentation=doc) for name, doc in _COUNTERS.items()
        }
        out.update({name: OffloadingGaugeMetadata(documentation=doc) for name, doc in _GAUGES.items()})
        return out

    # ------------------------------------------------------------------------------------------------ requests
    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        with self._lock:
            self._remote_misses.pop(req_context.req_id, None)

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        """HIT when the chunk is in the disk tier (an in-memory index: no I/O), RETRY while it is being stored
        here or looked up in Redis, MISS otherwise."""
        h = sequence_hash_of(key)
        with self._lock:
            if h in self._pool:
                self._counters.hits += 1
                return LookupResult.HIT
            if h in self._storing or h in self._probing:
                return LookupResult.RETRY
            if self._bm.remote() is None or self._stopping:
                self._counters.misses += 1
                return LookupResult.MISS
            missed = self._remote_misses.get(req_context.req_id)
            if missed is not None and h in missed:
                self._counters.misses += 1
                return LookupResult.MISS
            self._probing.add(h)
            self._outstanding += 1
        self._submit(self._readers, self._probe_remote, key, h, req_context.req_id)
        return LookupResult.RETRY

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        hashes = [sequence_hash_of(k) for k in keys]
        if hashes:
            self._pool.touch(hashes)

    def has_pending_work(self) -> bool:
        # Redis look-ups are not jobs vLLM tracks: keep the engine stepping until their verdicts are in.
        return bool(self._probing)

    # ------------------------------------------------------------------------------------------------ jobs
    def submit_store(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        chunk_ids = [int(c) for c in job_metadata.chunk_ids]
        if len(keys) != len(chunk_ids):
            raise ValueError(f"job {job_metadata.job_id}: {len(keys)} keys but {len(chunk_ids)} chunk_ids")
        hashes = [sequence_hash_of(k) for k in keys]
        with self._lock:
            self._outstanding += 1
            for h in hashes:
                self._storing[h] = self._storing.get(h, 0) + 1
            self._store_queue.append(_StoreJob(job_metadata.job_id, keys, hashes, chunk_ids))
        self._submit(self._writers, self._store_batch)

    def submit_load(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        chunk_ids = [int(c) for c in job_metadata.chunk_ids]
        if len(keys) != len(chunk_ids):
            raise ValueError(f"job {job_metadata.job_id}: {len(keys)} keys but {len(chunk_ids)} chunk_ids")
        with self._lock:
            self._outstanding += 1
        self._submit(self._readers, self._load_job, job_metadata.job_id, keys, chunk_ids)

    def get_finished_jobs(self) -> Iterable[JobResult]:
        out = []
        finished = self._finished
        while finished:
            out.append(finished.popleft())
        return out

    def drain_jobs(self) -> None:
        """Wait until every submitted job (and Redis look-up) is done; their results are then queued."""
        with self._idle:
            while self._outstanding:
                self._idle.wait()
        self._sync_events()

    def take_events(self) -> Iterable[OffloadingEvent]:
        events = self._events
        if events is None:
            return []
        out = []
        while events:
            out.append(events.popleft())
        return out

    def _submit(self, pool: ThreadPoolExecutor, fn: Any, *args: Any) -> None:
        try:
            pool.submit(self._run, fn, *args)
        except RuntimeError:  # the executor is shut down: the job reports itself failed, never dropped silently
            self._run(fn, *args)

    def _run(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a bug: the task's own finally clauses still reported its jobs
            log.exception("TieredKvTier worker failed")

    def _done(self, n: int = 1) -> None:
        """``n`` jobs (or Redis look-ups) have been reported."""
        with self._idle:
            self._outstanding -= n
            if not self._outstanding:
                self._idle.notify_all()

    # -- stores ---------------------------------------------------------------------------------------------
    def _store_batch(self) -> None:
        """Take the queued store jobs (up to about 64 MiB) and write them together: one allocation, one registry
        commit, one parallel write for all of them (the disk tier commits one batch at a time anyway)."""
        limit = max(1, _STAGE_BYTES // self._chunk)
        with self._lock:
            batch: list[_StoreJob] = []
            size = 0
            queue = self._store_queue
            while queue and (not batch or size + len(queue[0].keys) <= limit):
                job = queue.popleft()
                batch.append(job)
                size += len(job.keys)
        if not batch:
            return  # another task took them
        t0 = time.perf_counter()
        failed: set[bytes] | None = None  # None: the whole batch failed
        written = 0
        try:
            if not self._stopping:  # else cancelled before it started: reported failed, nothing touched
                keys = [k for j in batch for k in j.keys]
                hashes = [h for j in batch for h in j.hashes]
                chunk_ids = [c for j in batch for c in j.chunk_ids]
                failed, written = self._store(keys, hashes, chunk_ids)
        except TieredKvError as exc:
            log.warning("storing %d chunks of %d jobs failed: %s", size, len(batch), exc)
        finally:
            elapsed = time.perf_counter() - t0
            with self._lock:
                for job in batch:
                    for h in job.hashes:
                        n = self._storing.get(h, 0) - 1
                        if n > 0:
                            self._storing[h] = n
                        else:
                            self._storing.pop(h, None)
                c = self._counters
                c.stored_bytes += written * self._chunk
            for job in batch:
                ok = failed is not None and not any(h in failed for h in job.hashes)
                if not ok:
                    with self._lock:
                        self._counters.store_failed += len(job.keys)
                elif self._events is not None:
                    self._events.append(
                        OffloadingEvent(keys=job.keys, medium=Medium.STORAGE, removed=False, locality=self.locality)
                    )
                self._finished.append(
                    JobResult(
                        job_id=job.job_id,
                        success=ok,
                        transfer_time=elapsed,
                        transfer_bytes=len(job.keys) * self._chunk if ok else None,
                    )
                )
            self._done(len(batch))

    def _store(self, keys: list[OffloadKey], hashes: list[bytes], chunk_ids: list[int]) -> tuple[set[bytes], int]:
        """Write the chunks this tier lacks; returns (the hashes that found no room, chunks written)."""
        pool = self._pool
        rows = self._rows
        assert rows is not None
        todo: list[int] = []
        seen: set[bytes] = set()
        for i, h in enumerate(hashes):
            if h not in pool and h not in seen:  # already held (or twice in the job): nothing to write
                seen.add(h)
                todo.append(i)
        if not todo:
            return set(), 0
        blocks = pool.allocate_up_to(len(todo))  # evicts the coldest chunks when full (ARC)
        no_room = {hashes[i] for i in todo[len(blocks) :]}
        if no_room:
            log.warning("tier full of held chunks: %d of %d chunks not stored", len(no_room), len(todo))
        todo = todo[: len(blocks)]
        try:
            if self._events is not None:
                with self._lock:
                    for i in todo:
                        self._key_of[hashes[i]] = keys[i]
            shape = (1, 1, _PAGE, self._chunk // _PAGE)
            # Stage the primary rows by reference (contiguous runs of chunk ids as one view, no copy); the disk
            # tier copies them once into its write buffer, checksums that, and writes it.
            start = 0
            while start < len(todo):
                end = start + 1
                while end < len(todo) and chunk_ids[todo[end]] == chunk_ids[todo[end - 1]] + 1:
                    end += 1
                first = chunk_ids[todo[start]]
                self._check_chunk(first + (end - start) - 1)
                self._check_chunk(first)
                pool.scatter(blocks[start:end], rows[first : first + end - start].view(end - start, *shape))
                start = end
            records = [_key_record(keys[i]) for i in todo]
            registered = pool.register_blocks(blocks, [hashes[i] for i in todo], records)
        except BaseException:
            pool.release_blocks(blocks)
            raise
        pool.release_blocks(registered)
        self._sync_events()
        return no_room, len(todo)

    def _check_chunk(self, cid: int) -> None:
        if not 0 <= cid < self._num_chunks:
            raise DiskTierError(f"chunk id {cid} is outside the primary tier ({self._num_chunks} chunks)")

    # -- loads ----------------------------------------------------------------------------------------------
    def _load_job(self, job_id: int, keys: list[OffloadKey], chunk_ids: list[int]) -> None:
        t0 = time.perf_counter()
        good: list[OffloadKey] = []
        try:
            if not self._stopping:
                good = self._load(keys, chunk_ids)
        except TieredKvError as exc:
            log.warning("load job %d (%d chunks) failed: %s", job_id, len(keys), exc)
            good = []
        finally:
            n = len(good)
            with self._lock:
                self._counters.loaded_bytes += n * self._chunk
                self._counters.load_failed += len(keys) - n
            ok = n == len(keys)
            self._finished.append(
                JobResult(
                    job_id=job_id,
                    success=ok,
                    successful_keys=None if ok or not good else tuple(good),
                    transfer_time=time.perf_counter() - t0,
                    transfer_bytes=n * self._chunk,
                )
            )
            self._done()

    def _stage(self, n: int) -> torch.Tensor:
        """A per-thread, 4 KiB-aligned staging buffer of ``n`` chunks (reads bypass the page cache into it)."""
        buf: torch.Tensor | None = getattr(self._local, "stage", None)
        need = n * self._chunk
        if buf is None or buf.numel() < need:
            raw = torch.empty(need + _ALIGN, dtype=torch.uint8)
            skip = (-raw.data_ptr()) % _ALIGN
            buf = raw[skip : skip + need]
            self._local.stage = buf
        return buf[:need].view(n, 1, 1, _PAGE, self._chunk // _PAGE)

    def _load(self, keys: list[OffloadKey], chunk_ids: list[int]) -> list[OffloadKey]:
        """Copy the held, verified chunks into their primary rows; returns the keys delivered."""
        pool = self._pool
        rows = self._rows
        assert rows is not None
        for cid in chunk_ids:
            self._check_chunk(cid)
        hashes = [sequence_hash_of(k) for k in keys]
        records = [_key_record(k) for k in keys]
        # The stored keys, checked by the match: a chunk stored under another key (a hash collision) is a miss.
        tokens = None if None in records else np.frombuffer(b"".join(records), dtype="<u4")  # type: ignore[arg-type]
        per_round = max(1, _STAGE_BYTES // self._chunk)
        good: list[OffloadKey] = []
        i, n = 0, len(keys)
        while i < n:
            # The run of held chunks from i (one prefix match); the chunk that ends it early is missing: skipped.
            end = min(n, i + per_round)
            run = pool.match_sequence_hashes(hashes[i:end], tokens=None if tokens is None else tokens[i * _PAGE :])
            start, i = i, i + len(run)
            if i < end:
                i += 1
            if not run:
                continue
            try:
                data, bad = pool.gather(run, self._stage(len(run)))  # verified; failed ones are dropped, counted
                flat = data.view(len(run), self._chunk).numpy()
                ok = [j for j in range(len(run)) if j not in set(bad)]
                # One numpy row copy per chunk: far less per-call overhead than torch's copy_ for 64 KiB rows.
                dst = rows.numpy()
                for j in ok:
                    dst[chunk_ids[start + j]] = flat[j]
                good.extend(keys[start + j] for j in ok)
            finally:
                pool.release_blocks(run)
        return good

    # -- Redis look-ups -------------------------------------------------------------------------------------
    def _probe_remote(self, key: OffloadKey, h: bytes, req_id: str) -> None:
        found = False
        try:
            if not self._stopping:
                blocks = self._bm.match_sequence_hashes([h])  # a verified Redis hit is copied into the disk tier
                found = bool(blocks)
                self._pool.release_blocks(blocks)
        except TieredKvError as exc:
            log.warning("Redis look-up of %s failed: %s", h.hex(), exc)
        finally:
            with self._lock:
                self._probing.discard(h)
                if found:
                    self._counters.remote_hits += 1
                    if self._events is not None:
                        self._key_of[h] = key
                else:
                    self._remote_misses.setdefault(req_id, set()).add(h)
            self._done()

    # ------------------------------------------------------------------------------------------------ events
    def _on_kv_event(self, ev: KvEvent) -> None:
        """Dispatcher thread: disk removals (evictions, corrupt chunks) become vLLM removal events."""
        if ev.kind == "vllm-sync":
            with self._synced:
                self._sync_done = max(self._sync_done, int.from_bytes(ev.sequence_hashes[0], "big"))
                self._synced.notify_all()
            return
        if ev.kind != "removed" or ev.tier != "disk" or self._events is None:
            return
        with self._lock:
            keys = [k for k in (self._key_of.pop(h, None) for h in ev.sequence_hashes) if k is not None]
        if keys:
            self._events.append(
                OffloadingEvent(keys=keys, medium=Medium.STORAGE, removed=True, locality=self.locality)
            )

    def _sync_events(self) -> None:
        """Wait until tiered_kv's event dispatcher has delivered everything published so far (a marker round trip),
        so that a job's removal events are queued before the job is reported."""
        if self._events is None or self._closed or not self._bm.events.active:
            return
        with self._synced:
            self._sync_asked += 1
            mine = self._sync_asked
        self._bm.events.publish("vllm-sync", "disk", [mine.to_bytes(8, "big")])
        with self._synced:
            self._synced.wait_for(lambda: self._sync_done >= mine, timeout=5.0)

    # ------------------------------------------------------------------------------------------------ stats
    def get_stats(self) -> OffloadingConnectorStats | None:
        from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadingConnectorStats

        stats = OffloadingConnectorStats()
        pm = self._pool.metrics
        with self._lock:
            c, self._counters = self._counters, _Counters()
            evictions, self._seen_evictions = pm.evictions - self._seen_evictions, pm.evictions
            corrupt, self._seen_corrupt = pm.corrupt - self._seen_corrupt, pm.corrupt
        for name, value in (
            (_Metric.LOOKUP_HITS, c.hits),
            (_Metric.LOOKUP_MISSES, c.misses),
            (_Metric.STORED_BYTES, c.stored_bytes),
            (_Metric.LOADED_BYTES, c.loaded_bytes),
            (_Metric.STORE_FAILED_CHUNKS, c.store_failed),
            (_Metric.LOAD_FAILED_CHUNKS, c.load_failed),
            (_Metric.CORRUPT_CHUNKS, corrupt),
            (_Metric.EVICTED_CHUNKS, evictions),
            (_Metric.REMOTE_HITS, c.remote_hits),
        ):
            if value:
                stats.increase_counter(name, value)
        stats.set_gauge(_Metric.USED_CHUNKS, len(self._pool))
        stats.set_gauge(_Metric.CAPACITY_CHUNKS, self.num_blocks)
        return stats

    def metrics(self) -> dict[str, Any]:
        """tiered_kv's own metrics of the underlying manager (see ``KvBlockManager.metrics``)."""
        return self._bm.metrics()

    # ------------------------------------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Cancel queued jobs (reported as failed), wait for running ones, make stored chunks durable, close.

        After this returns no thread of the tier touches the primary memoryview, which vLLM then unmaps.
        """
        with self._lock:
            if self._closed:
                return
            self._stopping = True
        # Queued jobs start, see _stopping and report failure without touching memory; running ones finish.
        self._readers.shutdown(wait=True)
        self._writers.shutdown(wait=True)
        self.drain_jobs()
        with self._lock:
            self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        try:
            self._bm.close()
        finally:
            # Drop every view of the primary memory so vLLM can release its memoryview and unmap the region.
            self._local = threading.local()
            self._rows = None
            flat, self._flat = self._flat, None
            if flat is not None and flat is not self._primary_kv_view:
                try:
                    flat.release()
                except BufferError:  # a view escaped (a bug): vLLM then keeps its region mapped, and says so
                    log.warning("TieredKvTier %s: a view of the primary memory is still alive at shutdown", self.path)

    def __repr__(self) -> str:
        return f"TieredKvTier({self.path!r}, {len(self._pool)}/{self.num_blocks} chunks of {self._chunk} bytes)"


_KNOWN_KEYS = (
    "path",
    "num_blocks",
    "bytes",
    "durability",
    "writeback",
    "remote_url",
    "remote_mode",
    "remote_timeout",
    "read_threads",
    "write_threads",
    "enable_kv_events",
    "locality",
)

