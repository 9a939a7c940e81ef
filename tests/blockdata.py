"""Block test data shared by the disk and remote tier tests and their child processes (no pytest imports here).

Block bytes are a deterministic function of the block's hash, so any process can check what any other stored.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tiered_kv.config import ModelConfig

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def seq_hash(tag: str, i: int) -> bytes:
    """A deterministic 32-byte hash for test block ``i`` of stream ``tag``."""
    return hashlib.sha256(f"{tag}:{i}".encode()).digest()


def block_bytes(h: bytes, model: ModelConfig) -> torch.Tensor:
    """The bytes a block with hash ``h`` holds: a deterministic function of the hash (and the model)."""
    rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
    raw = rng.integers(0, 256, size=model.block_size_bytes, dtype=np.uint8)
    return torch.from_numpy(raw).view(model.torch_dtype).reshape(model.block_shape)


def blocks_for(hashes: Sequence[bytes], model: ModelConfig) -> torch.Tensor:
    """A ``[n, *block_shape]`` tensor of :func:`block_bytes` for each hash."""
    if not hashes:
        return torch.empty((0, *model.block_shape), dtype=model.torch_dtype)
    return torch.stack([block_bytes(h, model) for h in hashes])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (random bytes contain NaNs, which torch.equal treats as unequal)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def child_env(helpers_dir: Path) -> dict[str, str]:
    """Environment for a child Python that imports tiered_kv, this module and the helpers in ``helpers_dir``."""
    env = dict(os.environ)
    path = [str(REPO_ROOT), str(TESTS_DIR), str(helpers_dir), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["PYTHONUNBUFFERED"] = "1"
    return env
