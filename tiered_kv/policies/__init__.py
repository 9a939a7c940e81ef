"""Eviction policies: ARC (default) and LRU, plus user-registered ones."""

from .arc import ARCPolicy
from .base import EvictionPolicy, PolicyFactory, available_policies, create_policy, register_eviction_policy
from .lru import LRUPolicy

register_eviction_policy("arc", ARCPolicy)
register_eviction_policy("lru", LRUPolicy)

__all__ = [
    "ARCPolicy",
    "EvictionPolicy",
    "LRUPolicy",
    "PolicyFactory",
    "available_policies",
    "create_policy",
    "register_eviction_policy",
]
