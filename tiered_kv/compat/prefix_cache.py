"""Seed 002 (PrefixCacheManager): block-level content-addressed prefix caching, on the tiered engine.

::

    cache = PrefixCacheManager(block_size=16, max_blocks=1024, host_blocks=8192)
    hashes = cache.compute_block_hashes(prompt_token_ids)          # one BlockHash per full block
    hit = cache.get_cached_blocks(hashes)                         # longest cached prefix, referenced
    new = cache.allocate_blocks(hashes, start_index=len(hit))     # blocks for the rest
    ...write the new blocks' KV (new[i].layer_view(layer, outer))...
    cache.free_blocks([b.block_id for b in hit + new])            # new blocks become cached; all evictable

Hashes are the engine's chained sequence hashes (:func:`~tiered_kv.hashing.compute_sequence_hashes`), so
:func:`hash_block_tokens` chained by hand, :meth:`PrefixCacheManager.compute_block_hashes` and a
:class:`~tiered_kv.manager.KvBlockManager` of the same algorithm and namespace agree. A :class:`BlockHash` carries
its block's token ids, and lookups pass them on, so a hash collision is a miss rather than another prompt's KV.

One difference from a pure bookkeeping cache: the engine caches a block only once its data is written, so the
blocks :meth:`PrefixCacheManager.allocate_blocks` returns become cached when they are freed (the request is done)
or when :meth:`PrefixCacheManager.commit_blocks` is called, not at allocation.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..config import DiskConfig, KvBlockManagerConfig, LayoutConfig, ModelConfig
from ..enums import DeviceType, DType, HashAlgorithm, plain
from ..errors import ConfigError, InvalidBlockError
from ..hashing import (
    _ROOT_MAGIC,
    _as_uint32,
    _encode_extra_keys,
    _frames,
    _root_hash,
    compute_cache_keys,
    compute_prefix_match,
    hash_length,
)
from ..manager import KvBlockManager
from ..pool import BlockPool as TierPool
from ._handles import Block, HandleTable

__all__ = [
    "BlockHash",
    "CacheBlock",
    "HashAlgorithm",
    "PrefixCacheManager",
    "compute_cache_keys",
    "compute_prefix_match",
    "get_hash_function",
    "hash_block_tokens",
    "init_none_hash",
]

#: Seed 002's name for a block of the cache.
CacheBlock = Block


class BlockHash(bytes):
    """A block hash that carries the token ids (and extra keys) it was computed from.

    Equal to, and hashing like, the plain hash bytes, so it can be passed wherever a sequence hash is expected.
    """

    token_ids: tuple[int, ...]
    extra_keys: Any
    parent: bytes | None

    def __new__(
        cls, value: bytes, token_ids: Sequence[int] = (), extra_keys: Any = None, parent: bytes | None = None
    ) -> BlockHash:
        self = super().__new__(cls, value)
        self.token_ids = tuple(int(t) for t in token_ids)
        self.extra_keys = extra_keys
        self.parent = parent
        return self

    @property
    def hash_value(self) -> bytes:
        """The hash as plain bytes."""
        return bytes(self)

    def __repr__(self) -> str:
        return f"BlockHash({self.hex()[:16]}, {len(self.token_ids)} tokens)"


class HashFunction:
    """A block hash function: ``fn(data) -> digest``; ``algorithm`` names it (see :func:`get_hash_function`)."""

    __slots__ = ("_fn", "algorithm", "digest_size")

    def __init__(self, algorithm: str) -> None:
        import hashlib

        import xxhash

        self.algorithm = algorithm
        self.digest_size = hash_length(algorithm)
        self._fn: Callable[[bytes], bytes] = (
            xxhash.xxh3_128_digest if algorithm == "xxh3_128" else (lambda b: hashlib.sha256(b).digest())
        )

    def __call__(self, data: bytes) -> bytes:
        return self._fn(data)

    def __repr__(self) -> str:
        return f"HashFunction({self.algorithm!r})"


def get_hash_function(algorithm: str | HashAlgorithm = HashAlgorithm.SHA256) -> HashFunction:
    """The engine's hash function for ``algorithm`` (a :class:`HashAlgorithm` or its string).

    Raises:
        ValueError: an unknown algorithm.
    """
    algorithm = plain(algorithm)
    hash_length(algorithm)
    return HashFunction(str(algorithm))


def init_none_hash(hash_function: Callable[[bytes], bytes], namespace: str = "default") -> BlockHash:
    """The hash a chain starts from (the "parent" of a first block).

    For an engine hash function (from :func:`get_hash_function`) it is the root of ``namespace`` without salt,
    so chains built with :func:`hash_block_tokens` equal :func:`~tiered_kv.hashing.compute_sequence_hashes`'s.
    For any other ``bytes -> bytes`` function it is that function of the engine's root tag.
    """
    algorithm = getattr(hash_function, "algorithm", None)
    if algorithm is not None:
        return BlockHash(_root_hash(algorithm, namespace.encode("utf-8"), None))
    return BlockHash(bytes(hash_function(_ROOT_MAGIC)))


def hash_block_tokens(
    hash_function: Callable[[bytes], bytes],
    parent_block_hash: bytes | None,
    curr_block_token_ids: Sequence[int],
    extra_keys: Any = None,
) -> BlockHash:
    """Hash one block: ``hash_function(parent || extra keys || token ids as little-endian uint32)``.

    Args:
        hash_function: from :func:`get_hash_function`, or any ``bytes -> bytes`` function.
        parent_block_hash: the previous block's hash; None for a first block (then :func:`init_none_hash`).
        curr_block_token_ids: this block's token ids, each in ``[0, 2**32)``.
        extra_keys: None, a str/bytes/int, or a flat tuple of those (e.g. image hashes, a LoRA name).

    Raises:
        ValueError: empty or malformed token ids, or malformed extra keys.
    """
    tokens = _as_uint32(curr_block_token_ids, "curr_block_token_ids")
    if len(tokens) == 0:
        raise ValueError("curr_block_token_ids: a block needs at least one token")
    parent = init_none_hash(hash_function) if parent_block_hash is None else bytes(parent_block_hash)
    extra = _encode_extra_keys([extra_keys], 1, "extra_keys")[0]
    frame = _frames(tokens, 1, len(tokens), extra)[0]
    return BlockHash(
        bytes(hash_function(parent + frame)), tokens.tolist(), extra_keys, None if parent_block_hash is None else parent
    )


class PrefixCacheManager:
    """Seed 002's prefix cache over a :class:`~tiered_kv.manager.KvBlockManager` (also a context manager).

    Args:
        block_size: tokens per block.
        max_blocks: blocks of the top (device) tier; block ids are in ``[0, max_blocks)``.
        hash_algorithm: a :class:`HashAlgorithm` or its string.
        enable_eviction: False: cached blocks are never evicted, and allocation fails
            (``NotEnoughBlocksAvailable``) once every block is cached or in use.
        num_layers, inner_dim, dtype: geometry of each block's KV data (small defaults).
        host_blocks, disk_path, disk_blocks: lower tiers (evicted blocks are demoted there and found again).
        namespace: model name/revision, part of every hash.
        device_type: "auto", "cuda" or "cpu".
        manager: run on this manager instead of creating one (the caller owns its lifetime; the other geometry
            arguments are then ignored).
    """

    def __init__(
        self,
        block_size: int,
        max_blocks: int,
        hash_algorithm: str | HashAlgorithm = HashAlgorithm.SHA256,
        enable_eviction: bool = True,
        *,
        num_layers: int = 1,
        inner_dim: int = 64,
        dtype: str | DType = "float16",
        host_blocks: int = 0,
        disk_path: str | os.PathLike[str] | None = None,
        disk_blocks: int = 0,
        namespace: str = "default",
        device_type: str | DeviceType = "auto",
        manager: KvBlockManager | None = None,
    ) -> None:
        if not isinstance(enable_eviction, bool):
            raise ConfigError("enable_eviction", enable_eviction, "must be a bool")
        if manager is None:
            if (disk_path is None) != (disk_blocks == 0):
                raise ConfigError("disk_blocks", disk_blocks, "give disk_path and disk_blocks > 0 together")
            config = KvBlockManagerConfig(
                model=ModelConfig(num_layers=num_layers, inner_dim=inner_dim, page_size=block_size, dtype=dtype),
                device=LayoutConfig(num_blocks=max_blocks),
                host=LayoutConfig(num_blocks=host_blocks) if host_blocks else None,
                disk=DiskConfig(path=disk_path, num_blocks=disk_blocks) if disk_path is not None else None,
                eviction="arc" if enable_eviction else "none",
                hash_algorithm=hash_algorithm,
                namespace=namespace,
                device_type=device_type,
            )
            manager = KvBlockManager(config)
            self._owns_manager = True
        else:
            self._owns_manager = False
        self.manager = manager
        self.block_size = manager.model.page_size
        self.max_blocks = manager.top.total_blocks()
        self.hash_algorithm = HashAlgorithm(manager.config.hash_algorithm)
        self.enable_eviction = enable_eviction
        self.hash_function = get_hash_function(self.hash_algorithm)
        self.pool: TierPool = manager.top
        self._table = HandleTable(self.pool)
        # Allocated blocks waiting for their data: block id -> (hash, token ids); cached when freed or committed.
        self._pending: dict[int, tuple[bytes, tuple[int, ...]]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ hashing
    def compute_block_hashes(
        self, token_ids: Sequence[int], extra_keys_per_block: Sequence[Any] | None = None
    ) -> list[BlockHash]:
        """One :class:`BlockHash` per full block of ``token_ids`` (a trailing partial block gets none).

        ``extra_keys_per_block``: None, or one entry per block (entries past the full blocks are ignored).
        """
        ids = [int(t) for t in _as_uint32(token_ids, "token_ids").tolist()]
        n = len(ids) // self.block_size
        extra = None if extra_keys_per_block is None else list(extra_keys_per_block)[:n]
        hashes = self.manager.sequence_hashes(ids, extra_keys=extra)
        bs = self.block_size
        return [
            BlockHash(h, ids[i * bs : (i + 1) * bs], None if extra is None else extra[i], hashes[i - 1] if i else None)
            for i, h in enumerate(hashes)
        ]

    # ------------------------------------------------------------------------------------------------ lookups
    def get_cached_blocks(self, block_hashes: Sequence[bytes]) -> list[Block]:
        """The longest cached prefix of ``block_hashes``, each block referenced (drop with :meth:`free_blocks`).

        Blocks found in a lower tier are promoted to the device tier. When every hash carries its token ids (a
        :class:`BlockHash`), a block cached with other token ids is a miss.
        """
        hashes = list(block_hashes)
        tokens = None
        if hashes and all(isinstance(h, BlockHash) and len(h.token_ids) == self.block_size for h in hashes):
            tokens = [t for h in hashes for t in h.token_ids]  # type: ignore[attr-defined]
        return self._table.add(self.manager.match_sequence_hashes(hashes, tokens=tokens))

    def allocate_blocks(self, block_hashes: Sequence[bytes], start_index: int = 0) -> list[Block]:
        """Allocate blocks for ``block_hashes[start_index:]`` (all or nothing), evicting if enabled.

        Each block becomes cached under its hash when freed or committed, after its data is written.

        Raises:
            NotEnoughBlocksAvailable: the device tier cannot give them; nothing was allocated.
            ValueError: ``start_index`` out of range, or a malformed hash.
        """
        hashes = self.pool.validate_hashes(list(block_hashes), "block_hashes")
        if isinstance(start_index, bool) or not isinstance(start_index, int) or not 0 <= start_index <= len(hashes):
            raise ValueError(f"start_index must be an int in [0, {len(hashes)}], got {start_index!r}")
        todo = list(block_hashes)[start_index:]
        blocks = self.pool.allocate_blocks(len(todo))
        with self._lock:
            for b, h in zip(blocks, todo):
                self._pending[b.block_id] = (bytes(h), getattr(h, "token_ids", ()))
        return self._table.add(blocks)

    def commit_blocks(self, block_ids: Sequence[int]) -> list[Block]:
        """Cache allocated blocks now (their data is written), keeping the reference; returns them.

        A hash another request cached meanwhile keeps that block: the reference moves to it (its id is returned).

        Raises:
            BlockNotComplete: a block's data was never written (nothing is committed then).
            InvalidBlockError: an id is not an allocated block awaiting its data.
        """
        ids = list(block_ids)
        with self._lock:
            missing = [i for i, bid in enumerate(ids) if bid not in self._pending]
            if missing:
                raise InvalidBlockError(f"block_ids[{missing[0]}]: block {ids[missing[0]]!r} is not awaiting data")
            entries = [self._pending.pop(bid) for bid in ids]
        mutables = self._table.take_mutable(ids)
        page = self.block_size
        tokens = [t if len(t) == page else None for _, t in entries]
        try:
            cached = self.pool.register_blocks(mutables, [h for h, _ in entries], tokens)
        except BaseException:
            self._table.add(mutables)
            with self._lock:
                self._pending.update(zip(ids, entries))
            raise
        return self._table.add(cached)

    # -------------------------------------------------------------------------------------------- references
    def free_blocks(self, block_ids: Sequence[int], cache: bool = True) -> None:
        """Drop one reference per id. Allocated blocks whose data was written become cached first; unwritten ones
        (an aborted request) and, with ``cache=False``, all of them are just freed.

        Raises:
            InvalidBlockError: an id holds no reference here.
        """
        ids = list(block_ids)
        with self._lock:
            pending = [bid for bid in dict.fromkeys(ids) if bid in self._pending]
        # Only blocks whose data was written can be cached (BlockNotComplete otherwise): the rest are just freed.
        fill = [bid for bid in pending if cache and getattr(self._table.handle(bid), "written", False)]
        if fill:
            # A hash cached meanwhile by another request moved the reference to that block: follow it.
            moved = {old: new.block_id for old, new in zip(fill, self.commit_blocks(fill))}
            ids = [moved.get(bid, bid) for bid in ids]
        with self._lock:
            for bid in pending:
                self._pending.pop(bid, None)
        self.pool.release_blocks(self._table.pop(ids))

    def pin_block(self, block_id: int) -> None:
        """Keep a cached block from eviction until :meth:`unpin_block` (pins are counted)."""
        self.pool.pin_blocks([self._hash(block_id)])

    def unpin_block(self, block_id: int) -> None:
        """Undo one :meth:`pin_block`."""
        self.pool.unpin_blocks([self._hash(block_id)])

    def reset(self) -> None:
        """Forget everything: drop the references held here (uncommitted blocks are freed, not cached) and every
        cached block of every tier.

        Raises:
            InvalidBlockError: blocks are pinned, or held through the manager directly.
        """
        with self._lock:
            self._pending.clear()
        self.pool.release_blocks(self._table.drain())
        self.manager.reset()

    def get_stats(self) -> dict[str, Any]:
        """Cached blocks, hits, misses, hit rate, evictions, residency and occupancy of the device tier, plus
        every tier's counters under "tiers"."""
        stats = self.pool.stats()
        stats.update(
            num_cached_blocks=len(self.pool),
            max_blocks=self.max_blocks,
            block_size=self.block_size,
            hash_algorithm=self.hash_algorithm.value,
            enable_eviction=self.enable_eviction,
            pending_blocks=len(self._pending),
            tiers=self.manager.metrics(),
        )
        return stats

    # ------------------------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Release what this facade holds and close the manager it created; idempotent."""
        with self._lock:
            self._pending.clear()
        self._table.close(self.manager, owns_manager=self._owns_manager)

    def __enter__(self) -> PrefixCacheManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _hash(self, block_id: int) -> bytes:
        h = self.pool.hash_of(block_id) if isinstance(block_id, int) and 0 <= block_id < self.max_blocks else None
        if h is None:
            raise InvalidBlockError(f"block {block_id!r} is not cached (commit or free it after writing its data)")
        return h

