"""Eviction policies: ARC (default), LRU and "none" (never evict), plus user-registered ones."""

from .arc import ARCPolicy
from .base import EvictionPolicy, PolicyFactory, available_policies, create_policy, register_eviction_policy
from .keep import NoEvictionPolicy
from .lru import LRUPolicy
from .predicate import BlockMetadata, PredicatePolicy, predicate_policy

register_eviction_policy("arc", ARCPolicy)
register_eviction_policy("lru", LRUPolicy)
register_eviction_policy("none", NoEvictionPolicy)

__all__ = [
    "ARCPolicy",
    "BlockMetadata",
    "EvictionPolicy",
    "LRUPolicy",
    "NoEvictionPolicy",
    "PolicyFactory",
    "PredicatePolicy",
    "available_policies",
    "create_policy",
    "predicate_policy",
    "register_eviction_policy",
]
