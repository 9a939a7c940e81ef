"""The Python APIs of the earlier KV-cache systems tiered_kv replaces, as thin facades over
:class:`~tiered_kv.manager.KvBlockManager`.

Those systems are called seeds 000 to 004 here and in the tests (the numbering their users know them by). One
module per seed system; each maps the seed's names and arguments onto the engine and keeps no logic of its own,
so a seed user gets the device / host / disk tiers underneath:

* :mod:`.block_pool` — seed 000 (BlockPoolManager): ``BlockPool``, ``BlockPoolConfig``, ``KVCacheMetricsCollector``,
  ``ARCPolicy``, ``compute_block_hash``.
* :mod:`.eviction` — seed 001 (Block Pool guide): ``EvictionMode``, ``should_evict`` predicate policies,
  ``BlockNotComplete``.
* :mod:`.prefix_cache` — seed 002 (PrefixCacheManager): ``PrefixCacheManager``, ``HashAlgorithm``, ``BlockHash``,
  ``hash_block_tokens``, ``init_none_hash``, ``get_hash_function``.
* :mod:`.kv_cache` — seed 003 (KVCacheManager): ``KVCacheManager``, ``KVCacheConfig``, ``KVCacheBlocks``,
  ``KVCacheTransfer``, ``DeviceType``, ``DType``, ``create_kv_cache_manager``.

Seed 004 (KvBlockManager) is the engine's own API (:class:`tiered_kv.KvBlockManager`), including
``get_remote_blocks_immutable`` / ``get_remote_blocks_mutable`` (:mod:`tiered_kv.peers`) and cancellation on drop.
"""

from .block_pool import (
    ARCPolicy,
    Block,
    BlockPool,
    BlockPoolConfig,
    BlockState,
    EvictionEvent,
    KVCacheMetricsCollector,
    compute_block_hash,
)
from .eviction import (
    BlockMetadata,
    BlockNotComplete,
    EvictionMode,
    PredicatePolicy,
    predicate_policy,
    register_eviction_policy,
)
from .kv_cache import (
    DeviceType,
    DType,
    KVCacheBlocks,
    KVCacheConfig,
    KVCacheManager,
    KVCacheTransfer,
    create_kv_cache_manager,
)
from .prefix_cache import (
    BlockHash,
    CacheBlock,
    HashAlgorithm,
    PrefixCacheManager,
    compute_cache_keys,
    compute_prefix_match,
    get_hash_function,
    hash_block_tokens,
    init_none_hash,
)

__all__ = [
    "ARCPolicy",
    "Block",
    "BlockHash",
    "BlockMetadata",
    "BlockNotComplete",
    "BlockPool",
    "BlockPoolConfig",
    "BlockState",
    "CacheBlock",
    "DType",
    "DeviceType",
    "EvictionEvent",
    "EvictionMode",
    "HashAlgorithm",
    "KVCacheBlocks",
    "KVCacheConfig",
    "KVCacheManager",
    "KVCacheMetricsCollector",
    "KVCacheTransfer",
    "PredicatePolicy",
    "PrefixCacheManager",
    "compute_block_hash",
    "compute_cache_keys",
    "compute_prefix_match",
    "create_kv_cache_manager",
    "get_hash_function",
    "hash_block_tokens",
    "init_none_hash",
    "predicate_policy",
    "register_eviction_policy",
]
