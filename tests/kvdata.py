"""Test data helpers: a small model and block contents that are a deterministic function of the hash."""

from __future__ import annotations

import hashlib

import torch

from tiered_kv import KvBlockManager, ModelConfig
from tiered_kv.blocks import MutableBlock

SMALL = ModelConfig(num_layers=2, inner_dim=8, page_size=4, dtype="float32")


def content_for(sequence_hash: bytes, model: ModelConfig = SMALL) -> torch.Tensor:
    """Deterministic block data ``[layers, outer, page, inner]`` derived from a hash (verifiable on any tier)."""
    seed = int.from_bytes(hashlib.blake2b(sequence_hash, digest_size=8).digest(), "little") & (2**63 - 1)
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(model.block_shape, generator=g, dtype=torch.float32)
    return data.to(model.torch_dtype)


def fill(block: MutableBlock, sequence_hash: bytes, model: ModelConfig = SMALL) -> None:
    data = content_for(sequence_hash, model)
    for layer in range(model.num_layers):
        for outer in range(model.outer_dim):
            block.layer_view(layer, outer).copy_(data[layer, outer])


def block_data(block: object, model: ModelConfig = SMALL) -> torch.Tensor:
    return torch.stack(
        [
            torch.stack([block.layer_view(layer, outer) for outer in range(model.outer_dim)])  # type: ignore[attr-defined]
            for layer in range(model.num_layers)
        ]
    )


def hashes(n: int, seed: int = 0, algorithm: str = "sha256") -> list[bytes]:
    """``n`` distinct chained hashes of a token sequence."""
    from tiered_kv import compute_sequence_hashes

    return compute_sequence_hashes(
        [(seed * 1_000_003 + i) % 2**32 for i in range(n * SMALL.page_size)], SMALL.page_size, algorithm=algorithm
    )


def store(bm: KvBlockManager, hashes: list[bytes], batch: int = 2) -> None:
    """Fill and register ``hashes`` in the top tier ``batch`` blocks at a time, releasing them (inactive)."""
    pool = bm.top
    for i in range(0, len(hashes), batch):
        part = hashes[i : i + batch]
        blocks = pool.allocate_blocks(len(part))
        for b, h in zip(blocks, part):
            fill(b, h)
        pool.release_blocks(pool.register_blocks(blocks, part))
