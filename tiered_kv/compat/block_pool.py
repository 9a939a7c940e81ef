"""Seed 000 (BlockPoolManager): vLLM's BlockPool API, by integer block id, on the tiered engine.

::

    pool = BlockPool(BlockPoolConfig(num_blocks=64, block_size=16, host_blocks=256))
    blocks = pool.get_new_blocks(2)                     # allocated, one reference each
    ...fill blocks[i].layer_view(layer, outer)...
    pool.cache_blocks([b.block_id for b in blocks], [compute_block_hash(b"...") , ...])
    pool.free_blocks([b.block_id for b in blocks])      # cached, evictable
    hit = pool.lookup_cached_block(h)                   # takes no reference
    pool.touch([hit.block_id])                          # takes one (a prefix hit), freed by free_blocks

Block ids are slots of the top tier (``device``). A cached block evicted from it is demoted to the host and disk
tiers when they are configured, and :meth:`BlockPool.lookup_cached_block` promotes it back, so a seed user gets
the lower tiers without changing a call. Every call maps onto :class:`~tiered_kv.manager.KvBlockManager` and
:class:`~tiered_kv.pool.BlockPool`; this module keeps only the id-to-handle table.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import KW_ONLY, dataclass
from typing import Any

from ..config import DiskConfig, KvBlockManagerConfig, LayoutConfig, ModelConfig, _positive_int
from ..enums import DeviceType, DType, HashAlgorithm, plain
from ..errors import ConfigError, InvalidBlockError
from ..manager import KvBlockManager
from ..metrics import EvictionEvent
from ..policies import ARCPolicy
from ..pool import BlockPool as TierPool
from ..pool import BlockState
from ._handles import Block, HandleTable

__all__ = [
    "ARCPolicy",
    "Block",
    "BlockPool",
    "BlockPoolConfig",
    "BlockState",
    "EvictionEvent",
    "KVCacheMetricsCollector",
    "compute_block_hash",
]


def compute_block_hash(content: bytes, algorithm: str | HashAlgorithm = HashAlgorithm.SHA256) -> bytes:
    """Hash a block's content (e.g. its token ids as bytes) into a key for :meth:`BlockPool.cache_blocks`.

    Args:
        content: bytes (or bytearray / memoryview).
        algorithm: the pool's hash algorithm; its digest length is the key length the pool expects.

    Raises:
        ValueError: ``content`` is not bytes-like or the algorithm is unknown.
    """
    if not isinstance(content, (bytes, bytearray, memoryview)):
        raise ValueError(f"content: expected bytes, got {type(content).__name__}")
    algorithm = plain(algorithm)
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128_digest(bytes(content))
    if algorithm != "sha256":
        raise ValueError(f"algorithm: expected 'sha256' or 'xxh3_128', got {algorithm!r}")
    return hashlib.sha256(bytes(content)).digest()


@dataclass(frozen=True)
class BlockPoolConfig:
    """Seed 000's pool configuration, with the engine's tiers below it (``BlockPoolConfig(64, 16)`` works as in
    the seed; the engine's additions are keyword-only).

    Args:
        num_blocks: blocks of the top (device) tier; block ids are in ``[0, num_blocks)``.
        block_size: tokens per block.
        eviction: "arc" (default), "lru", "none", or a registered policy name.
        num_layers, inner_dim, dtype: the geometry of the KV data each block holds (``inner_dim`` = heads x
            head_dim); small defaults for a pool used for its bookkeeping only.
        host_blocks: blocks of a host tier below the device (0: none).
        disk_path, disk_blocks: a persistent disk tier below those (both or neither).
        hash_algorithm: the key length :meth:`BlockPool.cache_blocks` expects (sha256: 32 bytes).
        device_type: "auto", "cuda" or "cpu" (a DeviceType is accepted).
    """

    num_blocks: int
    block_size: int
    eviction: str = "arc"
    _: KW_ONLY  # the seed's fields may be positional; the engine's additions are keyword-only
    num_layers: int = 1
    inner_dim: int = 64
    dtype: str | DType = "float16"
    host_blocks: int = 0
    disk_path: str | os.PathLike[str] | None = None
    disk_blocks: int = 0
    hash_algorithm: str | HashAlgorithm = "sha256"
    device_type: str | DeviceType = "auto"

    def __post_init__(self) -> None:
        _positive_int("num_blocks", self.num_blocks)
        _positive_int("block_size", self.block_size)
        if isinstance(self.host_blocks, bool) or not isinstance(self.host_blocks, int) or self.host_blocks < 0:
            raise ConfigError("host_blocks", self.host_blocks, "must be an int >= 0")
        if (self.disk_path is None) != (self.disk_blocks == 0):
            raise ConfigError("disk_blocks", self.disk_blocks, "give disk_path and disk_blocks > 0 together")
        self.manager_config()  # the engine validates the rest (eviction, dtype, ...), naming the field

    def manager_config(self) -> KvBlockManagerConfig:
        """The :class:`~tiered_kv.config.KvBlockManagerConfig` this pool runs on."""
        model = ModelConfig(num_layers=self.num_layers, inner_dim=self.inner_dim, page_size=self.block_size,
                            dtype=self.dtype)
        return KvBlockManagerConfig(
            model=model,
            device=LayoutConfig(num_blocks=self.num_blocks),
            host=LayoutConfig(num_blocks=self.host_blocks) if self.host_blocks else None,
            disk=DiskConfig(path=self.disk_path, num_blocks=self.disk_blocks) if self.disk_path is not None else None,
            eviction=self.eviction,
            hash_algorithm=self.hash_algorithm,
            device_type=self.device_type,
        )


class BlockPool:
    """Seed 000's ``BlockPool`` over a :class:`~tiered_kv.manager.KvBlockManager` (also a context manager).

    Args:
        config: a :class:`BlockPoolConfig`.
        manager: run on this manager's top tier instead of creating one (the caller then owns its lifetime).
    """

    def __init__(self, config: BlockPoolConfig | None = None, *, manager: KvBlockManager | None = None) -> None:
        if (config is None) == (manager is None):
            raise ValueError("give exactly one of config or manager")
        self.config = config
        self.manager = manager if manager is not None else KvBlockManager(config.manager_config())  # type: ignore[union-attr]
        self._owns_manager = manager is None
        self.pool: TierPool = self.manager.top
        self._table = HandleTable(self.pool)

    # ------------------------------------------------------------------------------------------- allocation
    def get_new_blocks(self, num_blocks: int) -> list[Block]:
        """Allocate ``num_blocks`` blocks (all or nothing), evicting cached blocks if needed.

        Raises:
            NotEnoughBlocksAvailable: fewer blocks are free or evictable; nothing was allocated.
        """
        return self._table.add(self.pool.allocate_blocks(num_blocks))

    def cache_blocks(self, block_ids: list[int], block_hashes: list[bytes]) -> list[Block]:
        """Make allocated blocks cached (matchable) under ``block_hashes``; each keeps its one reference.

        A hash that is already cached keeps its existing block: the given block is freed and the reference moves
        to the existing one, whose id is returned in its place.

        Raises:
            InvalidBlockError: an id is not an allocated, uncached block of this pool.
            ValueError: lengths differ or a hash has the wrong type or length (see :func:`compute_block_hash`).
        """
        if len(block_ids) != len(block_hashes):
            raise ValueError(f"block_ids and block_hashes differ in length: {len(block_ids)} != {len(block_hashes)}")
        hashes = self.pool.validate_hashes(block_hashes, "block_hashes")
        mutables = self._table.take_mutable(block_ids)
        try:
            cached = self.pool.register_blocks(mutables, hashes)
        except BaseException:
            self._table.add(mutables)
            raise
        return self._table.add(cached)

    def free_blocks(self, block_ids: list[int]) -> None:
        """Drop one reference per id; a cached block stays matchable (evictable) once none are left.

        Raises:
            InvalidBlockError: an id holds no reference here (nothing is released then).
        """
        self.pool.release_blocks(self._table.pop(block_ids))

    def touch(self, block_ids: list[int]) -> None:
        """Take one more reference on cached blocks (a prefix hit by another request) and refresh their recency.

        Raises:
            InvalidBlockError: an id is not a cached block (nothing is taken then).
        """
        hashes = self._hashes(block_ids)
        held = self.pool.acquire(hashes)
        self.pool.touch(hashes)
        self._table.add(held)

    def lookup_cached_block(self, block_hash: bytes) -> Block | None:
        """The cached block for ``block_hash``, or None; takes no reference.

        A block the device tier evicted but a lower tier holds is promoted back first, so it is found.
        """
        found = self.manager.match_sequence_hashes([block_hash])
        if not found:
            return None
        block = self._table.block(found[0].block_id)
        self.pool.release_blocks(found)
        return block

    def pin_blocks(self, block_ids: list[int]) -> None:
        """Pin cached blocks: never evicted until unpinned (pins are counted)."""
        self.pool.pin_blocks(self._hashes(block_ids))

    def unpin_blocks(self, block_ids: list[int]) -> None:
        """Undo one :meth:`pin_blocks` per id."""
        self.pool.unpin_blocks(self._hashes(block_ids))

    def get_block(self, block_id: int) -> Block:
        """The :class:`Block` view of an id."""
        self.pool.block_state(block_id)  # validates the range
        return self._table.block(block_id)

    def get_num_free_blocks(self) -> int:
        """Free plus evictable blocks of the device tier."""
        return self.pool.available_blocks()

    def get_usage(self) -> float:
        """Fraction of the device tier that is allocated or referenced."""
        return self.pool.usage_rate()

    def trigger_eviction(self, mode: str = "normal") -> int:
        """Evict cached, unreferenced blocks now (``EvictionMode.NORMAL`` / ``AGGRESSIVE``); returns the count."""
        return self.pool.trigger_eviction(mode)

    def get_stats(self) -> dict[str, Any]:
        """The device tier's counters (hits, evictions, residency, ARC lists, ...) plus every tier's under "tiers"."""
        stats = self.pool.stats()
        stats["num_blocks"] = self.pool.total_blocks()
        stats["block_size"] = self.manager.model.page_size
        stats["tiers"] = self.manager.metrics()
        return stats

    def reset(self) -> None:
        """Drop every cached block of every tier; refuses (InvalidBlockError) while blocks are held or pinned."""
        self.manager.reset()

    # ------------------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release what this facade holds and close the manager it created; idempotent."""
        self._table.close(self.manager, owns_manager=self._owns_manager)

    def __enter__(self) -> BlockPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _hashes(self, block_ids: list[int]) -> list[bytes]:
        out = []
        for i, bid in enumerate(block_ids):
            h = self.pool.hash_of(bid) if isinstance(bid, int) and 0 <= bid < self.pool.total_blocks() else None
            if h is None:
                raise InvalidBlockError(f"block_ids[{i}]: block {bid!r} is not a cached block of the device tier")
            out.append(h)
        return out


class KVCacheMetricsCollector:
    """Seed 000's metrics collector for one pool (a :class:`BlockPool` facade or a tier's pool).

    The pool records its own evictions; :meth:`record_eviction` adds events reported from outside.
    """

    def __init__(self, pool: BlockPool | TierPool) -> None:
        self._pool: TierPool = pool.pool if isinstance(pool, BlockPool) else pool

    def record_eviction(self, event: EvictionEvent) -> None:
        """Count an eviction event and keep it among the recent ones."""
        if not isinstance(event, EvictionEvent):
            raise ValueError(f"event: expected an EvictionEvent, got {type(event).__name__}")
        self._pool.metrics.record_event(event)

    def get_metrics(self) -> dict[str, Any]:
        """Hits, misses, hit rate, evictions, eviction rate (60 s), residency and occupancy of the pool."""
        return self._pool.stats()

    def get_recent_evictions(self, limit: int = 100) -> list[EvictionEvent]:
        """The newest ``limit`` eviction events, newest last (the pool keeps the last 1,024)."""
        return self._pool.metrics.recent_evictions(limit)

    def get_eviction_rate(self, window_seconds: float = 60.0) -> float:
        """Evictions per second over the last ``window_seconds`` (from counters, not from the kept events)."""
        return self._pool.metrics.eviction_rate(window_seconds)

