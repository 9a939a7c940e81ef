"""Deterministic test data for the conformance suites (no pytest imports here)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from ..config import ModelConfig

__all__ = ["SMALL_MODEL", "ODD_MODEL", "DTYPES", "seq_hash", "hashes", "block_bytes", "blocks_for", "same", "as_bytes"]

#: 2 layers x 2 x 16 tokens x 64 x fp16 = 8 KiB blocks (a multiple of 4 KiB: O_DIRECT writes them in place).
SMALL_MODEL = ModelConfig(num_layers=2, inner_dim=64, page_size=16, dtype="float16")
#: 3 layers x 2 x 4 x 40 x bf16 = 1920-byte blocks: not a multiple of 4 KiB (padded slots on disk).
ODD_MODEL = ModelConfig(num_layers=3, inner_dim=40, page_size=4, dtype="bfloat16")
#: Dtypes every storage must move bit for bit (float8 and int8 included: no arithmetic on the way).
DTYPES = ("float16", "bfloat16", "float32", "int8", "float8_e4m3fn")


def seq_hash(tag: str, i: int, length: int = 32) -> bytes:
    """A deterministic ``length``-byte hash for block ``i`` of stream ``tag`` (plain bytes: no parent)."""
    return hashlib.sha256(f"{tag}:{i}".encode()).digest()[:length]


def hashes(tag: str, n: int, length: int = 32) -> list[bytes]:
    """``n`` distinct hashes of stream ``tag``."""
    return [seq_hash(tag, i, length) for i in range(n)]


def block_bytes(h: bytes, model: ModelConfig) -> torch.Tensor:
    """The bytes block ``h`` holds: random bytes seeded by the hash (NaN patterns included for float dtypes)."""
    rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
    raw = rng.integers(0, 256, size=model.block_size_bytes, dtype=np.uint8)
    return torch.from_numpy(raw).view(model.torch_dtype).reshape(model.block_shape)


def blocks_for(hs: Sequence[bytes], model: ModelConfig) -> torch.Tensor:
    """A ``[n, *block_shape]`` tensor of :func:`block_bytes` for each hash."""
    if not hs:
        return torch.empty((0, *model.block_shape), dtype=model.torch_dtype)
    return torch.stack([block_bytes(h, model) for h in hs])


def as_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (on the CPU), for comparison with a model's ``bytes`` values."""
    return bytes(t.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (random bytes hold NaNs, which ``torch.equal`` treats as unequal)."""
    return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype and as_bytes(a) == as_bytes(b)
