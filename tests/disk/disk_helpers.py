"""Helpers shared by the disk tier tests and their child processes (no pytest imports here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from blockdata import REPO_ROOT, block_bytes, blocks_for, same, seq_hash
from blockdata import child_env as _child_env

from tiered_kv.config import DiskConfig, ModelConfig

__all__ = [
    "ALGO",
    "MODEL",
    "NAMESPACE",
    "ODD_MODEL",
    "PYTHON",
    "REPO_ROOT",
    "block_bytes",
    "blocks_for",
    "child_env",
    "disk_config",
    "same",
    "seq_hash",
]

#: 2 layers x 2 x 16 tokens x 256 x fp16 = 32 KiB blocks (a multiple of 4 KiB: O_DIRECT writes in place).
MODEL = ModelConfig(num_layers=2, inner_dim=256, page_size=16, dtype="float16")
#: 2 x 2 x 4 x 96 x bf16 = 3 KiB blocks: not a multiple of 4 KiB (exercises the padded slot path).
ODD_MODEL = ModelConfig(num_layers=2, inner_dim=96, page_size=4, dtype="bfloat16")
ALGO = "sha256"
NAMESPACE = "test-ns"


def disk_config(path: str | os.PathLike[str], num_blocks: int, durability: str = "batch") -> DiskConfig:
    return DiskConfig(path=os.fspath(path), num_blocks=num_blocks, backend="posix", durability=durability)


def child_env() -> dict[str, str]:
    """Environment for a child Python that must import tiered_kv and these helpers."""
    return _child_env(Path(__file__).parent)


PYTHON = sys.executable
