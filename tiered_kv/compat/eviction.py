"""Seed 001 (Block Pool guide): eviction modes, the ``should_evict(block)`` policy trait, ``BlockNotComplete``.

* ``pool.trigger_eviction(EvictionMode.NORMAL)`` frees inactive blocks until a quarter of the tier is free;
  ``EvictionMode.AGGRESSIVE`` evicts every inactive block (plain strings are accepted too). Available on each
  tier's :class:`~tiered_kv.pool.BlockPool`, on :class:`~tiered_kv.manager.KvBlockManager` (``tier=`` picks the
  pool) and on the seed facades.
* A custom policy as the seed writes it::

      class IdlePolicy:
          def should_evict(self, block: BlockMetadata) -> bool:
              return block.last_access_time < time.monotonic() - 300

      register_eviction_policy("idle", IdlePolicy())     # or predicate_policy(fn) for a plain function
      KvBlockManagerConfig(..., eviction="idle")

  The predicate ranks LRU-ordered victims (see :class:`~tiered_kv.policies.predicate.PredicatePolicy`); the full
  :class:`~tiered_kv.policies.base.EvictionPolicy` interface remains available for complete control.
* ``register_blocks`` of a block whose data was never written raises :class:`~tiered_kv.errors.BlockNotComplete`
  (writing through ``layer_view``/``write``, ``scatter`` or a copy counts).
"""

from __future__ import annotations

from ..enums import EvictionMode
from ..errors import BlockNotComplete
from ..policies import BlockMetadata, EvictionPolicy, PredicatePolicy, predicate_policy, register_eviction_policy

__all__ = [
    "BlockMetadata",
    "BlockNotComplete",
    "EvictionMode",
    "EvictionPolicy",
    "PredicatePolicy",
    "predicate_policy",
    "register_eviction_policy",
]
