"""Issue 13's two scenarios, runnable in a child process that the tests kill with SIGKILL.

    python prefix_scenarios.py users PATH      60 users share a 32-block system prompt (3 rounds), then wait
                                               for the background writeback, print "written" and block on stdin
    python prefix_scenarios.py burst PATH END  a 512-block prefix then a 768-block continuation, registered 64 at a
                                               time with no compute between; END "flush" (flush, close, exit) or
                                               "kill" (print "registered" at once and block on stdin)
"""

from __future__ import annotations

import hashlib
import sys

import torch

from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, LayoutConfig, ModelConfig

USERS_MODEL = ModelConfig(num_layers=2, inner_dim=64, page_size=16, dtype="float16")
BURST_MODEL = ModelConfig(num_layers=4, inner_dim=128, page_size=16, dtype="float32")
N_USERS, SYSTEM_BLOCKS, USER_BLOCKS = 60, 32, 24
PREFIX_BLOCKS, CHAIN_BLOCKS = 512, 768


def users_config(path: str) -> KvBlockManagerConfig:
    return KvBlockManagerConfig(
        model=USERS_MODEL, device=LayoutConfig(num_blocks=96), host=LayoutConfig(num_blocks=64),
        disk=DiskConfig(path=path, num_blocks=4096, backend="posix", writeback_s=1.0), device_type="cpu",
    )


def burst_config(path: str) -> KvBlockManagerConfig:
    return KvBlockManagerConfig(
        model=BURST_MODEL, device=LayoutConfig(num_blocks=576), host=LayoutConfig(num_blocks=128),
        disk=DiskConfig(path=path, num_blocks=768, backend="posix", writeback_s=1.0), device_type="cpu",
    )


def user_tokens(user: int) -> list[int]:
    system = [(7 * i) % 50000 for i in range(SYSTEM_BLOCKS * 16)]
    own = [(user * 1000 + 13 * i) % 50000 for i in range(USER_BLOCKS * 16)]
    return system + own


def burst_tokens() -> list[int]:
    return [(31 * i + 5) % 60000 for i in range((PREFIX_BLOCKS + CHAIN_BLOCKS) * 16)]


def content(h: bytes, model: ModelConfig) -> torch.Tensor:
    seed = int.from_bytes(hashlib.blake2b(h, digest_size=8).digest(), "little") & (2**63 - 1)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.block_shape, generator=g).to(model.torch_dtype)


def serve(bm: KvBlockManager, hashes: list[bytes], batch: int = 64) -> int:
    """Match, then compute (fill) and register the rest, ``batch`` blocks at a time; returns the blocks matched."""
    got = bm.match_sequence_hashes(hashes)
    top = bm.top
    n = len(got)
    top.release_blocks(got)
    for i in range(n, len(hashes), batch):
        part = hashes[i : i + batch]
        blocks = top.allocate_blocks(len(part))
        top.scatter(blocks, torch.stack([content(h, bm.model) for h in part]))
        top.release_blocks(top.register_blocks(blocks, part))
    return n


def users(path: str) -> None:
    bm = KvBlockManager(users_config(path))
    for _ in range(3):
        for u in range(N_USERS):
            serve(bm, bm.sequence_hashes(user_tokens(u)), batch=8)
    if not bm.scheduler.wait_for_writeback(timeout=60.0):
        print("writeback did not finish", flush=True)
        sys.exit(1)
    print("written", flush=True)
    sys.stdin.read()


def burst(path: str, end: str) -> None:
    bm = KvBlockManager(burst_config(path))
    hashes = bm.sequence_hashes(burst_tokens())
    serve(bm, hashes[:PREFIX_BLOCKS])
    serve(bm, hashes)
    if end == "kill":
        print("registered", flush=True)
        sys.stdin.read()
    bm.flush()
    bm.close()
    print("closed", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "users":
        users(sys.argv[2])
    else:
        burst(sys.argv[2], sys.argv[3])
