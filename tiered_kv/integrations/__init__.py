"""Integrations of tiered_kv with model runtimes.

Each integration is its own module and imports its runtime itself, so ``import tiered_kv`` never needs one:

- :mod:`tiered_kv.integrations.transformers`: store a Hugging Face ``DynamicCache``'s full blocks in a
  :class:`~tiered_kv.KvBlockManager` and rebuild a cache from matched blocks (``pip install 'tiered_kv[serving]'``).
"""

from __future__ import annotations

__all__: list[str] = []
