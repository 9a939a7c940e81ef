"""Integrations of tiered_kv with model runtimes.

Each integration is its own module and imports its runtime itself, so ``import tiered_kv`` never needs one:

- :mod:`tiered_kv.integrations.transformers`: store a Hugging Face ``DynamicCache``'s full blocks in a
  :class:`~tiered_kv.KvBlockManager` and rebuild a cache from matched blocks (``pip install 'tiered_kv[serving]'``).
- :mod:`tiered_kv.integrations.vllm`: ``TieredKvTier``, the disk tier (and optionally the Redis tier) as a vLLM 0.33
  KV offloading secondary tier, loaded by vLLM from ``--kv-transfer-config`` (vLLM 0.33; ``tools/install_vllm.sh``
  installs its offloading modules on a CPU machine).
"""

from __future__ import annotations

__all__: list[str] = []
