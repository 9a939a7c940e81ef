"""Issue 13's two scenarios, runnable in a child process that the tests kill with SIGKILL.

    python prefix_scenarios.py users PATH      60 users share a 32-block system prompt (3 rounds), then wait
                                               for the background writeback, print "written" and block on stdin
    python prefix_scenarios.py burst PATH END  a 512-block prefix then a 768-block continuation, registered 64 at a
                                               time with no compute between; END "flush" (flush, close, exit) or
                                               "kill" (print "registered" at once and block on stdin)
    python prefix_scenarios.py serve PATH WB   a :class:`ChainDriver` on PATH (writeback_s WB, "none" for None)
                                               answering JSON commands, one per stdin line (the crash state
                                               machine's child, killed with SIGKILL)
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import torch

from tiered_kv import (
    DiskConfig,
    KvBlockManager,
    KvBlockManagerConfig,
    LayoutConfig,
    ModelConfig,
    NotEnoughBlocksAvailable,
    compute_sequence_hashes,
)
from tiered_kv.blocks import ImmutableBlock

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


# -- the crash state machine's system under test (tests/test_crash_state_machine.py) ------------------------------
#: 2 layers x 2 x 4 tokens x 8 x fp32: 512 B blocks (tiny, so that a step costs bookkeeping, not bytes).
CHAIN_MODEL = ModelConfig(num_layers=2, inner_dim=8, page_size=4, dtype="float32")
N_CONVS, GROUP_BLOCKS, CONV_BLOCKS = 6, 3, 8  # conversations c, c + 3 share their first GROUP_BLOCKS blocks


def chain_config(path: str, writeback_s: float | None) -> KvBlockManagerConfig:
    """Device 4 / host 6 / disk 12 blocks: every tier overflows within a few steps."""
    return KvBlockManagerConfig(
        model=CHAIN_MODEL, device=LayoutConfig(num_blocks=4), host=LayoutConfig(num_blocks=6),
        disk=DiskConfig(path=path, num_blocks=12, backend="posix", durability="batch", writeback_s=writeback_s),
        eviction="lru", device_type="cpu",
    )


def conv_tokens(conv: int) -> list[int]:
    group = [(conv % 3) * 10_000 + i for i in range(GROUP_BLOCKS * CHAIN_MODEL.page_size)]
    own = [100_000 * (conv + 1) + i for i in range((CONV_BLOCKS - GROUP_BLOCKS) * CHAIN_MODEL.page_size)]
    return group + own


def digest(data: torch.Tensor) -> str:
    """A short digest of a block's bytes (what the model compares, parent and child alike)."""
    return hashlib.blake2b(data.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def _block_bytes(b: ImmutableBlock, model: ModelConfig) -> torch.Tensor:
    return torch.stack(
        [torch.stack([b.layer_view(la, o) for o in range(model.outer_dim)]) for la in range(model.num_layers)]
    )


class ChainDriver:
    """A manager over :func:`chain_config`, driven by plain commands that return plain data (JSON-able), so that
    the same steps run in the test process or in a child process that the test kills.

    Block bytes are :func:`content` of the hash; matches report a digest of the bytes they read.
    """

    def __init__(self, path: str, writeback_s: float | None) -> None:
        self.bm = KvBlockManager(chain_config(path, writeback_s))
        self.writeback = writeback_s is not None
        self.hashes = [self.bm.sequence_hashes(conv_tokens(c)) for c in range(N_CONVS)]
        self.held: list[ImmutableBlock] = []

    @staticmethod
    def hashes_of(conv: int, n: int) -> list[bytes]:
        """The first ``n`` sequence hashes of conversation ``conv`` (what the driver's manager computes)."""
        cfg = chain_config("unused", None)
        return compute_sequence_hashes(
            conv_tokens(conv)[: n * CHAIN_MODEL.page_size], CHAIN_MODEL.page_size, algorithm=cfg.hash_algorithm,
            namespace=cfg.namespace,
        )

    def _matched(self, got: list[ImmutableBlock], keep: bool) -> list[list[str]]:
        out = [[b.sequence_hash.hex(), digest(_block_bytes(b, self.bm.model))] for b in got]
        if keep:
            self.held.extend(got)
        else:
            self.bm.top.release_blocks(got)
        return out

    def match(self, conv: int, n: int, keep: bool) -> list[list[str]]:
        """The matched prefix of conversation ``conv``'s first ``n`` blocks: ``[[hash hex, digest], ...]``."""
        return self._matched(self.bm.match_sequence_hashes(self.hashes[conv][:n]), keep)

    def register(self, conv: int, n: int, keep: bool) -> dict[str, Any]:
        """Match, then compute (fill) and register the rest of the first ``n`` blocks, as far as room allows."""
        hs = self.hashes[conv][:n]
        got = self.bm.match_sequence_hashes(hs)
        missing = hs[len(got) :]
        top = self.bm.top
        try:
            new = top.allocate_blocks(len(missing))
        except NotEnoughBlocksAvailable:
            new = []
        if new:
            top.scatter(new, torch.stack([content(h, self.bm.model) for h in missing]))
            got += top.register_blocks(new, missing)
        return {"registered": [h.hex() for h in missing[: len(new)]], "matched": self._matched(got, keep)}

    def release(self) -> None:
        self.bm.top.release_blocks(self.held)
        self.held = []

    def pressure(self, tier: str, n: int) -> int:
        """Allocate (and give back unregistered) up to ``n`` blocks of ``tier``: evicts its inactive blocks."""
        pool = {p.tier: p for p in self.bm.pools()}[tier]
        blocks = pool.allocate_up_to(n)
        pool.release_blocks(blocks)
        return len(blocks)

    def flush(self) -> None:
        self.bm.flush()

    def _snapshot(self) -> dict[str, dict[str, str | None]]:
        out: dict[str, dict[str, str | None]] = {}
        for pool in self.bm.pools():
            parents = {h: pool.parent_of(h) for h in pool.cached_hashes()}
            out[pool.tier] = {h.hex(): None if p is None else p.hex() for h, p in parents.items()}
        return out

    def tiers(self) -> dict[str, dict[str, str | None]]:
        """``{tier: {hash hex: parent hex or None}}`` once the background work is idle.

        Quiesced: the writeback caught up, no demotion queued or being written, what lost an ancestor reaped; and
        read twice to the same result, since a cleaner may still start a pass (its copies and the evictions they
        cause are reaped like any other).
        """
        last: dict[str, dict[str, str | None]] | None = None
        for _ in range(50):
            if self.writeback:
                self.bm.scheduler.wait_for_writeback(timeout=30.0)
            self.bm.scheduler.drain(30.0)
            self.bm.scheduler.reap()
            snap = self._snapshot()
            if snap == last:
                return snap
            last = snap
        raise AssertionError("the tiers did not settle")

    def crash_image(self, path: str) -> None:
        """Copy the disk tier as a ``kill -9`` now would leave it (``DiskStore.copy_to``)."""
        disk = self.bm.disk()
        assert disk is not None
        disk.storage.store.copy_to(path)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.release()
        self.bm.close()


def serve_commands(path: str, writeback: str) -> None:
    """Run a :class:`ChainDriver`: one JSON ``[method, args...]`` per stdin line, one JSON answer per line."""
    driver = ChainDriver(path, None if writeback == "none" else float(writeback))
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        method, *args = json.loads(line)
        print(json.dumps(getattr(driver, method)(*args)), flush=True)
        if method == "close":
            return


if __name__ == "__main__":
    if sys.argv[1] == "users":
        users(sys.argv[2])
    elif sys.argv[1] == "serve":
        serve_commands(sys.argv[2], sys.argv[3])
    else:
        burst(sys.argv[2], sys.argv[3])
