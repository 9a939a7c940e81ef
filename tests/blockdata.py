"""Block test data shared by the disk and remote tier tests and their child processes (no pytest imports here).

Block bytes are a deterministic function of the block's hash, so any process can check what any other stored.
"""

from __future__ import annotations

import os
from pathlib import Path

from tiered_kv.testing._data import block_bytes, blocks_for, same, seq_hash

__all__ = ["REPO_ROOT", "TESTS_DIR", "block_bytes", "blocks_for", "child_env", "same", "seq_hash"]

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def child_env(helpers_dir: Path) -> dict[str, str]:
    """Environment for a child Python that imports tiered_kv, this module and the helpers in ``helpers_dir``."""
    env = dict(os.environ)
    path = [str(REPO_ROOT), str(TESTS_DIR), str(helpers_dir), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["PYTHONUNBUFFERED"] = "1"
    return env
