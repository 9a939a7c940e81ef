"""The disk backend conformance suite (``tiered_kv.testing.BackendConformance``) on every built-in backend: posix
buffered, posix O_DIRECT, the fault-injecting wrapper at rate 0, kvikio on GPU machines; plus store-level checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from disk_helpers import ALGO, MODEL, NAMESPACE, blocks_for, disk_config, same, seq_hash

from tiered_kv.config import DiskConfig
from tiered_kv.errors import ConfigError, DiskTierError
from tiered_kv.storage.disk import (
    DiskBackend,
    DiskStore,
    FaultInjectingBackend,
    PosixBackend,
    kvikio_unavailable_reason,
    probe_direct_io,
)
from tiered_kv.storage.disk import store as store_module
from tiered_kv.testing import BackendConformance
from tiered_kv.testing import disk as suite_data


def test_suite_data_matches_these_tests() -> None:
    """The suite's expected bytes and geometry are the ones the other disk tests (and their children) use."""
    assert (suite_data.MODEL, suite_data.ALGO, suite_data.NAMESPACE) == (MODEL, ALGO, NAMESPACE)
    hs = [seq_hash("same", i) for i in range(3)]
    assert same(suite_data.blocks_for(hs, MODEL), blocks_for(hs, MODEL))


class TestPosixBuffered(BackendConformance):
    def make_backend(self) -> DiskBackend:
        return PosixBackend(direct=False)


class TestPosixDirect(BackendConformance):
    @pytest.fixture(autouse=True)
    def _needs_direct(self, tmp_path: Path) -> None:
        if not probe_direct_io(tmp_path):
            pytest.skip("this filesystem refuses O_DIRECT")

    def make_backend(self) -> DiskBackend:
        return PosixBackend(direct=True)


class TestFaultWrapperPassThrough(BackendConformance):
    """The fault wrapper at rate 0 is a conformant backend (the stress command relies on it)."""

    def make_backend(self) -> DiskBackend:
        return FaultInjectingBackend(PosixBackend(), rate=0.0, seed=1)


@pytest.mark.gpu
class TestKvikio(BackendConformance):
    @pytest.fixture(autouse=True)
    def _needs_kvikio(self) -> None:
        reason = kvikio_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)

    def make_backend(self) -> DiskBackend:
        from tiered_kv.storage.disk._kvikio import KvikioBackend

        return KvikioBackend()

    def test_cuda_round_trip(self, tmp_path: Path) -> None:
        with self.open(tmp_path / "t", 16) as s:
            hashes = [seq_hash("cuda", i) for i in range(8)]
            data = blocks_for(hashes, MODEL).cuda()
            s.write_blocks(hashes, list(range(8)), data)
            dest = torch.empty_like(data)
            out, bad = s.read_blocks(list(range(8)), out=dest)
            assert bad == [] and same(out, data)


def test_backend_selection(tmp_path: Path) -> None:
    reason = kvikio_unavailable_reason()
    cfg = DiskConfig(path=tmp_path / "k", num_blocks=4, backend="kvikio")
    if reason is not None:
        with pytest.raises(ConfigError) as info:
            DiskStore(cfg, MODEL, hash_algorithm=ALGO, namespace=NAMESPACE)
        assert info.value.field == "backend" and reason in str(info.value)
        assert not (tmp_path / "k").exists()
    with DiskStore(DiskConfig(path=tmp_path / "a", num_blocks=4), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE) as s:
        assert s.backend_name == ("posix" if reason is not None else "kvikio")


def test_readonly_without_tier(tmp_path: Path) -> None:
    with pytest.raises(DiskTierError, match="no disk tier"):
        DiskStore(disk_config(tmp_path / "none", 4), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE, readonly=True)
    assert not (tmp_path / "none").exists()


def test_unknown_format_version(tmp_path: Path) -> None:
    path = tmp_path / "t"
    make: Callable[[], DiskStore] = lambda: DiskStore(  # noqa: E731
        disk_config(path, 4), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE
    )
    with make() as s:
        assert s._registry is not None
        s._registry.commit(meta={**s._meta, "format_version": 99})
    with pytest.raises(DiskTierError, match="format version 99"):
        make()


def _registry_flags(path: Path, durability: str) -> tuple[bool, bool]:
    with DiskStore(disk_config(path, 4, durability), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE) as s:
        assert s._registry is not None
        flags = s._registry.env.flags()
        hashes = [seq_hash("flags", i) for i in range(2)]
        s.write_blocks(hashes, [0, 1], blocks_for(hashes, MODEL))
    with DiskStore(disk_config(path, 4, durability), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE) as s:
        out, bad = s.read_blocks([0, 1])
        assert bad == [] and same(out, blocks_for(hashes, MODEL))
    return flags["sync"], flags["metasync"]


@pytest.mark.parametrize(("durability", "flags"), [("sync", (True, True)), ("none", (False, False))])
def test_registry_sync_flags_per_durability(tmp_path: Path, durability: str, flags: tuple[bool, bool]) -> None:
    assert _registry_flags(tmp_path / "t", durability) == flags


def test_batch_old_flags_can_be_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # _BATCH_SYNCS_COMMITS = False restores MDB_NOSYNC (what tools/bench_durability.py compares against).
    monkeypatch.setattr(store_module, "_BATCH_SYNCS_COMMITS", False)
    assert _registry_flags(tmp_path / "t", "batch") == (False, False)


def test_batch_keeps_registry_integrity_on_power_loss(tmp_path: Path) -> None:
    # Issue 13 item 7: "batch" commits sync LMDB's data pages but not its meta page (MDB_NOMETASYNC: integrity
    # kept through a system crash, only the last transaction may be undone); MDB_NOSYNC could corrupt it.
    assert _registry_flags(tmp_path / "t", "batch") == (True, False)
