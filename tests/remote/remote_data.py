"""Test data shared by the remote tier tests and their child processes (no pytest or redis imports here)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from blockdata import REPO_ROOT, block_bytes, blocks_for, same, seq_hash
from blockdata import child_env as _child_env

from tiered_kv.config import ModelConfig

__all__ = [
    "ALGO",
    "MODEL",
    "NAMESPACE",
    "PYTHON",
    "REPO_ROOT",
    "SMALL_BF16",
    "block_bytes",
    "blocks_for",
    "child_env",
    "hashes",
    "same",
    "seq_hash",
    "wait_until_served",
]

PYTHON = sys.executable
ALGO = "sha256"
NAMESPACE = "remote-test"
#: 2 x 2 x 16 x 256 x fp16 = 32 KiB blocks (sent as a separate, uncopied buffer).
MODEL = ModelConfig(num_layers=2, inner_dim=256, page_size=16, dtype="float16")
#: 2 x 2 x 4 x 96 x bf16 = 3 KiB blocks (small: copied into the command buffer).
SMALL_BF16 = ModelConfig(num_layers=2, inner_dim=96, page_size=4, dtype="bfloat16")


def hashes(tag: str, n: int) -> list[bytes]:
    return [seq_hash(tag, i) for i in range(n)]


def child_env() -> dict[str, str]:
    """Environment for a child Python that imports tiered_kv and this module."""
    return _child_env(Path(__file__).parent)


def wait_until_served(store: Any, hs: list[bytes], data: torch.Tensor, what: str, within_s: float = 5.0) -> None:
    """Poll a RemoteStore until it serves every block of ``hs`` again (a real server or node coming back; there is
    no event to wait on), then check the bytes are ``data`` and that it had to reconnect."""
    deadline = time.monotonic() + within_s
    while not all(store.get_blocks(hs)[1]):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    out, ok = store.get_blocks(hs)
    assert all(ok) and same(out, data)
    assert store.metrics()["reconnects"] >= 1
