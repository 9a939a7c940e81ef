"""tiered_kv: a KV cache bigger than GPU memory.

KV blocks live in up to four tiers (device, pinned host, NVMe disk, and a remote tier in Redis shared across
nodes), are found again by a chained hash of their tokens, and move between tiers so that a returning prefix costs
a copy instead of a prefill. The disk tier survives restarts; the remote tier is shared by every manager with the
same model fingerprint and namespace.
"""

from .blocks import ImmutableBlock, MutableBlock, UnreleasedBlockWarning
from .compat.kv_cache import create_kv_cache_manager
from .config import DiskConfig, KvBlockManagerConfig, LayoutConfig, ModelConfig, OffloadConfig, RemoteConfig
from .enums import DeviceType, DType, EvictionMode, HashAlgorithm
from .errors import (
    BlockNotComplete,
    BlockPoolError,
    ConfigError,
    CorruptBlockError,
    DiskFullError,
    DiskTierError,
    InvalidBlockError,
    LayoutMismatchError,
    NotEnoughBlocksAvailable,
    RemoteTierError,
    ShutdownError,
    TieredKvError,
    TierLockedError,
)
from .hashing import SequenceHash, compute_cache_keys, compute_prefix_match, compute_sequence_hashes
from .manager import KvBlockManager, UnclosedManagerWarning
from .metrics import EvictionEvent
from .peers import BlockDescriptor
from .policies import ARCPolicy, EvictionPolicy, LRUPolicy, register_eviction_policy
from .pool import BlockPool, BlockState

__version__ = "0.1.0"

__all__ = [
    "ARCPolicy",
    "BlockDescriptor",
    "BlockNotComplete",
    "BlockPool",
    "BlockPoolError",
    "BlockState",
    "ConfigError",
    "CorruptBlockError",
    "DType",
    "DeviceType",
    "DiskConfig",
    "DiskFullError",
    "DiskTierError",
    "EvictionEvent",
    "EvictionMode",
    "EvictionPolicy",
    "HashAlgorithm",
    "ImmutableBlock",
    "InvalidBlockError",
    "KvBlockManager",
    "KvBlockManagerConfig",
    "LRUPolicy",
    "LayoutConfig",
    "LayoutMismatchError",
    "ModelConfig",
    "MutableBlock",
    "NotEnoughBlocksAvailable",
    "RemoteConfig",
    "OffloadConfig",
    "RemoteTierError",
    "SequenceHash",
    "ShutdownError",
    "TierLockedError",
    "TieredKvError",
    "UnclosedManagerWarning",
    "UnreleasedBlockWarning",
    "compute_cache_keys",
    "compute_prefix_match",
    "compute_sequence_hashes",
    "create_kv_cache_manager",
    "register_eviction_policy",
    "__version__",
]
