"""A Hypothesis state machine over the three-tier manager against a dict model.

The model records what was registered (hash -> bytes are a function of the hash). Invariants: every matched
block's bytes equal what was registered under its hash, every matched hash was registered, a match is a prefix,
blocks held by the test are never lost, and once everything is released the top tier's slots all come back.
"""

from __future__ import annotations

import shutil
import tempfile

import hypothesis.strategies as st
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from kvdata import SMALL, block_data, content_for, fill

from tiered_kv import (
    DiskConfig,
    KvBlockManager,
    KvBlockManagerConfig,
    LayoutConfig,
    NotEnoughBlocksAvailable,
    OffloadConfig,
)

TOKENS = list(range(4 * 10))


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tkv-sm-")
        self.bm = self._open()
        self.hashes = [self.bm.sequence_hashes([c * 100 + t for t in TOKENS]) for c in range(3)]
        self.registered: set[bytes] = set()
        self.held: list = []

    def _open(self) -> KvBlockManager:
        return KvBlockManager(
            KvBlockManagerConfig(
                model=SMALL,
                device=LayoutConfig(num_blocks=3),
                host=LayoutConfig(num_blocks=5),
                disk=DiskConfig(path=self.dir, num_blocks=12, backend="posix", durability="none", writeback_s=None),
                device_type="cpu",
                # No background cleaner or writeback: the machine steps them (rules clean, flush), so a failing
                # case replays the same way.
                offload=OffloadConfig(background_cleaning=False),
            )
        )

    @rule(conv=st.integers(0, 2), n=st.integers(1, 6), keep=st.booleans())
    def turn(self, conv: int, n: int, keep: bool) -> None:
        hs = self.hashes[conv][:n]
        got = self.bm.match_sequence_hashes(hs)
        assert [b.sequence_hash for b in got] == hs[: len(got)]
        for b in got:
            assert b.sequence_hash in self.registered
            assert b.tier == "device"
            assert torch.equal(block_data(b), content_for(b.sequence_hash))
        missing = hs[len(got) :]
        try:
            new = self.bm.top.allocate_blocks(len(missing))
        except NotEnoughBlocksAvailable:
            new = []
        for b, h in zip(new, missing):
            fill(b, h)
        got += self.bm.top.register_blocks(new, missing[: len(new)])
        self.registered.update(missing[: len(new)])
        if keep:
            self.held.extend(got)
        else:
            self.bm.top.release_blocks(got)

    # No preconditions on what the background workers influence (what a turn got to hold): Hypothesis replays
    # a failing case and needs the same rules enabled each time.
    @rule()
    def release_all(self) -> None:
        self.bm.top.release_blocks(self.held)
        self.held = []

    @rule()
    def restart(self) -> None:
        self.release_all()
        self.bm.close()
        self.bm = self._open()
        # Only what reached the disk survives a restart; the model keeps the union (a match may only return
        # registered hashes, so a smaller cache never breaks the invariants).

    @rule()
    def flush(self) -> None:
        self.bm.flush()

    @rule()
    def clean(self) -> None:
        self.bm.run_cleaner_once()

    @invariant()
    def held_blocks_intact(self) -> None:
        for b in self.held:
            assert b.sequence_hash in self.bm.top
            assert torch.equal(block_data(b), content_for(b.sequence_hash))
        stats = self.bm.top.stats()
        assert stats["free_blocks"] + stats["cached_blocks"] + stats["mutable_blocks"] == 3

    def teardown(self) -> None:
        self.bm.top.release_blocks(self.held)
        self.held = []
        self.bm.flush()
        assert self.bm.top.available_blocks() == 3  # nothing leaked
        self.bm.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = settings(max_examples=40, stateful_step_count=60, deadline=None)
