"""A Hypothesis state machine over register / match / release / evict / flush / close+reopen / crash-restart.

The system under test is a three-tier manager (device 4 / host 6 / disk 12 blocks, a disk tier in a temporary
directory) driven through its public API by :class:`prefix_scenarios.ChainDriver`: four conversations whose
chains share their first blocks pairwise, so that the tiers hold a small tree of chains. The model is a dict of
every registered hash -> the digest of the bytes registered under it.

Invariants:

* every block in any tier has its parent in some tier, and every block on disk has its parent on disk (checked
  once the background work is idle: a block on its way down, or one whose ancestor was just evicted, is in flux);
* after a restart (graceful or a crash), before the manager opens the tier, every block on disk has its parent on
  disk: the tier is prefix-closed as the crash or the close left it, not only after the orphan pruning at open;
* every matched block was registered and its bytes are the ones registered; a match is a prefix.

Two crash models:

* ``TestCrashStateMachine`` (default suite, in-process): the crash image is ``DiskStore.copy_to`` of the live
  tier: its committed registry rows and the bytes they point at, with no registry transaction in flight, queued
  deletions not applied and the memory tiers gone: what the page cache holds at a ``kill -9`` at that instant.
  The live manager is then closed (whatever it writes afterwards goes to the old directory) and the restart opens
  the image.
* ``TestCrashStateMachineKill9`` (``slow``): the manager lives in a child process (``prefix_scenarios.py serve``)
  and a crash is a real ``SIGKILL`` of that child at a step boundary, while its writeback, cleaner and committer
  threads run; the restart starts a new child on the same directory. A child costs seconds to start, so this
  variant runs few examples.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import prefix_scenarios as sc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tiered_kv.storage.disk import DiskStore

HERE = Path(__file__).resolve().parent
_WRITEBACK = st.sampled_from([None, 0.05])  # write-on-eviction only, or a busy background writeback

Tiers = dict[str, dict[str, str | None]]


def _disk_prefix_closed(path: str, writeback_s: float | None) -> set[str]:
    """The blocks on disk at ``path`` (read-only, before any manager prunes it), after checking prefix closure."""
    cfg = sc.chain_config(path, writeback_s)
    assert cfg.disk is not None
    with DiskStore(cfg.disk, cfg.model, hash_algorithm=cfg.hash_algorithm, namespace=cfg.namespace,
                   readonly=True) as store:
        on_disk = {e.hash.hex(): e.parent for e in store.entries()}
        orphans = store.orphans()
    assert orphans == [], f"{len(orphans)} blocks on disk without their parent on disk after the restart"
    return set(on_disk)


class _ChildDriver:
    """:class:`prefix_scenarios.ChainDriver` in a child process (one JSON command per line)."""

    def __init__(self, path: str, writeback_s: float | None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "prefix_scenarios.py"), "serve", path,
             "none" if writeback_s is None else str(writeback_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
        )
        assert self._answer() == "ready"

    def _answer(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"the child died; stderr:\n{err[-3000:]}")
        return json.loads(line)

    def call(self, method: str, *args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([method, *args]) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL


class _InProcessDriver:
    def __init__(self, path: str, writeback_s: float | None) -> None:
        self.driver = sc.ChainDriver(path, writeback_s)

    def call(self, method: str, *args: Any) -> Any:
        # The same JSON round trip as the child's, so that both variants compare the same data.
        return json.loads(json.dumps(getattr(self.driver, method)(*args)))


class _CrashMachine(RuleBasedStateMachine):
    """The rules and invariants; subclasses say how the manager runs and what a crash is."""

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="tkv-crash-sm-")
        self.lives = 0
        self.path = self._next_path()
        self.writeback_s: float | None = None
        self.driver: Any = None
        self.model: dict[str, str] = {}  # every hash ever registered (hex) -> digest of its registered bytes
        self.restarted = False

    def _next_path(self) -> str:
        self.lives += 1
        return os.path.join(self.root, f"life{self.lives}")

    def _open(self) -> Any:
        raise NotImplementedError

    @initialize(writeback_s=_WRITEBACK)
    def start(self, writeback_s: float | None) -> None:
        self.writeback_s = writeback_s
        self.driver = self._open()

    def _check_matched(self, matched: list[list[str]], conv: int, n: int) -> None:
        want = [h.hex() for h in sc.ChainDriver.hashes_of(conv, n)]
        assert [h for h, _ in matched] == want[: len(matched)], "a match must be a prefix of the request"
        for h, d in matched:
            assert h in self.model, f"matched {h[:12]}, which was never registered"
            assert d == self.model[h], f"block {h[:12]} matched with other bytes than registered"

    @rule(conv=st.integers(0, sc.N_CONVS - 1), n=st.integers(1, sc.CONV_BLOCKS), keep=st.booleans())
    def register(self, conv: int, n: int, keep: bool) -> None:
        out = self.driver.call("register", conv, n, keep)
        for h in out["registered"]:
            self.model[h] = sc.digest(sc.content(bytes.fromhex(h), sc.CHAIN_MODEL))
        self._check_matched(out["matched"], conv, n)

    @rule(turns=st.lists(st.tuples(st.integers(0, sc.N_CONVS - 1), st.integers(1, sc.CONV_BLOCKS)), min_size=2,
                         max_size=6))
    def serve(self, turns: list[tuple[int, int]]) -> None:
        # Several conversations' turns in one step (registered and released): the tiers fill and overflow.
        for conv, n in turns:
            self.register(conv, n, False)

    @rule(conv=st.integers(0, sc.N_CONVS - 1), n=st.integers(1, sc.CONV_BLOCKS), keep=st.booleans())
    def match(self, conv: int, n: int, keep: bool) -> None:
        self._check_matched(self.driver.call("match", conv, n, keep), conv, n)

    @rule()
    def release(self) -> None:
        self.driver.call("release")

    @rule(tier=st.sampled_from(["device", "host", "disk"]), n=st.integers(1, 12))
    def evict(self, tier: str, n: int) -> None:
        self.driver.call("pressure", tier, n)

    @rule()
    def flush(self) -> None:
        self.driver.call("flush")

    @rule(crash=st.booleans())
    def restart(self, crash: bool) -> None:
        """A crash (see the module docstring for the crash model), or a graceful close; then a reopen."""
        if crash:
            self._crash()
        else:
            self.driver.call("close")
        self._after_restart()

    def _crash(self) -> None:
        raise NotImplementedError

    def _after_restart(self) -> None:
        _disk_prefix_closed(self.path, self.writeback_s)
        self.driver = self._open()
        self.restarted = True

    @invariant()
    @precondition(lambda self: self.driver is not None)
    def every_block_has_its_parent(self) -> None:
        tiers: Tiers = self.driver.call("tiers")
        anywhere = {h for blocks in tiers.values() for h in blocks}
        for tier, blocks in tiers.items():
            for h, parent in blocks.items():
                assert h in self.model, f"{tier} holds {h[:12]}, which was never registered"
                assert parent is None or parent in anywhere, f"{tier} holds {h[:12]} without its parent anywhere"
        disk = tiers.get("disk", {})
        for h, parent in disk.items():
            assert parent is None or parent in disk, f"disk holds {h[:12]} without its parent on disk"

    def teardown(self) -> None:
        if self.driver is not None:
            try:
                self.driver.call("close")
            finally:
                shutil.rmtree(self.root, ignore_errors=True)


class InProcessCrashMachine(_CrashMachine):
    def _open(self) -> Any:
        return _InProcessDriver(self.path, self.writeback_s)

    def _crash(self) -> None:
        image = self._next_path()
        self.driver.call("crash_image", image)  # what a kill -9 now would leave on disk
        self.driver.call("close")  # the old process's later writes land in the old directory
        self.path = image


class Kill9CrashMachine(_CrashMachine):
    def _open(self) -> Any:
        return _ChildDriver(self.path, self.writeback_s)

    def _crash(self) -> None:
        self.driver.kill9()


TestCrashStateMachine = InProcessCrashMachine.TestCase
TestCrashStateMachine.settings = settings(
    max_examples=20, stateful_step_count=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestCrashStateMachineKill9 = pytest.mark.slow(Kill9CrashMachine.TestCase)
TestCrashStateMachineKill9.settings = settings(
    max_examples=6, stateful_step_count=20, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
