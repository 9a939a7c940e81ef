"""Test data shared by the remote tier tests and their child processes (no pytest or redis imports here)."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tiered_kv.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
ALGO = "sha256"
NAMESPACE = "remote-test"
#: 2 x 2 x 16 x 256 x fp16 = 32 KiB blocks (sent as a separate, uncopied buffer).
MODEL = ModelConfig(num_layers=2, inner_dim=256, page_size=16, dtype="float16")
#: 2 x 2 x 4 x 96 x bf16 = 3 KiB blocks (small: copied into the command buffer).
SMALL_BF16 = ModelConfig(num_layers=2, inner_dim=96, page_size=4, dtype="bfloat16")


def seq_hash(tag: str, i: int) -> bytes:
    """A deterministic 32-byte hash for block ``i`` of stream ``tag``."""
    return hashlib.sha256(f"{tag}:{i}".encode()).digest()


def hashes(tag: str, n: int) -> list[bytes]:
    return [seq_hash(tag, i) for i in range(n)]


def block_bytes(h: bytes, model: ModelConfig) -> torch.Tensor:
    """The bytes a block with hash ``h`` holds: a deterministic function of the hash (and the model)."""
    rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
    raw = rng.integers(0, 256, size=model.block_size_bytes, dtype=np.uint8)
    return torch.from_numpy(raw).view(model.torch_dtype).reshape(model.block_shape)


def blocks_for(hs: Sequence[bytes], model: ModelConfig) -> torch.Tensor:
    """``[n, *block_shape]`` of :func:`block_bytes` for each hash."""
    if not hs:
        return torch.empty((0, *model.block_shape), dtype=model.torch_dtype)
    return torch.stack([block_bytes(h, model) for h in hs])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (random bytes contain NaNs, which torch.equal treats as unequal)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def child_env() -> dict[str, str]:
    """Environment for a child Python that imports tiered_kv and this module."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env
