"""Conformance tests every disk backend passes (posix buffered, posix O_DIRECT, kvikio on GPU machines)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from disk_helpers import (
    ALGO,
    MODEL,
    NAMESPACE,
    ODD_MODEL,
    PYTHON,
    blocks_for,
    child_env,
    disk_config,
    same,
    seq_hash,
)

from tiered_kv.config import DiskConfig, ModelConfig
from tiered_kv.errors import ConfigError, DiskTierError, LayoutMismatchError
from tiered_kv.storage.disk import (
    DiskBackend,
    DiskStore,
    FaultInjectingBackend,
    PosixBackend,
    kvikio_unavailable_reason,
    probe_direct_io,
)
from tiered_kv.storage.disk import store as store_module

CHILD = str(Path(__file__).with_name("disk_child.py"))


def _snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file of a tier except LMDB's reader table (lock.mdb)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != "lock.mdb":
            out[str(p.relative_to(path))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


class BackendConformance:
    """Subclasses provide :meth:`make_backend`; everything else is shared."""

    def make_backend(self) -> DiskBackend:
        raise NotImplementedError

    def open(
        self,
        path: Path,
        num_blocks: int = 64,
        model: ModelConfig = MODEL,
        durability: str = "batch",
        algo: str = ALGO,
        namespace: str = NAMESPACE,
        readonly: bool = False,
    ) -> DiskStore:
        return DiskStore(
            disk_config(path, num_blocks, durability),
            model,
            hash_algorithm=algo,
            namespace=namespace,
            readonly=readonly,
            backend=self.make_backend(),
        )

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[DiskStore]:
        s = self.open(tmp_path / "tier")
        yield s
        s.close()

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8", "float8_e4m3fn"])
    @pytest.mark.parametrize("durability", ["sync", "batch", "none"])
    def test_round_trip_dtypes(self, tmp_path: Path, dtype: str, durability: str) -> None:
        model = ModelConfig(num_layers=3, inner_dim=40, page_size=4, dtype=dtype)  # odd sizes: padded slots
        with self.open(tmp_path / "t", 32, model, durability) as s:
            hashes = [seq_hash(dtype, i) for i in range(20)]
            slots = list(range(31, 11, -1))
            data = blocks_for(hashes, model)
            s.write_blocks(hashes, slots, data)
            out, bad = s.read_blocks(slots)
            assert bad == []
            assert out.dtype == model.torch_dtype
            assert same(out.view(torch.uint8), data.view(torch.uint8))
            # A caller-provided destination, in a different order.
            dest = torch.zeros_like(data[:5])
            out2, bad2 = s.read_blocks(slots[::-4], out=dest)
            assert out2 is dest and bad2 == []
            assert same(dest.view(torch.uint8), data[torch.arange(19, -1, -4)].view(torch.uint8))

    def test_many_slots_and_entries(self, store: DiskStore) -> None:
        hashes = [seq_hash("many", i) for i in range(64)]
        for start in range(0, 64, 16):
            batch = hashes[start : start + 16]
            store.write_blocks(batch, list(range(start, start + 16)), blocks_for(batch, MODEL))
        entries = store.entries()
        assert [e.hash for e in entries] == hashes  # oldest first (batches in order, ties by slot)
        assert {e.slot for e in entries} == set(range(64))
        assert all(e.size == MODEL.block_size_bytes and e.hits == 0 for e in entries)
        store.touch([hashes[0]])
        assert store.entries()[-1].hash == hashes[0]
        looked = store.lookup(hashes[0])
        assert looked is not None and looked.hits == 1
        out, bad = store.read_blocks(list(range(64)))
        assert bad == [] and same(out, blocks_for(hashes, MODEL))
        st = store.stats()
        assert st["blocks_used"] == 64 and st["blocks_free"] == 0 and st["capacity"] == 64
        assert st["hash_algorithm"] == ALGO and st["namespace"] == NAMESPACE
        assert st["fingerprint"] == MODEL.fingerprint()
        assert st["backend"] == store.backend_name

    def test_overwrite_after_delete(self, store: DiskStore) -> None:
        a = [seq_hash("a", i) for i in range(4)]
        b = [seq_hash("b", i) for i in range(4)]
        store.write_blocks(a, [0, 1, 2, 3], blocks_for(a, MODEL))
        with pytest.raises(DiskTierError, match="not free"):
            store.write_blocks(b, [3, 4, 5, 6], blocks_for(b, MODEL))
        assert store.lookup(b[1]) is None  # the refused batch left nothing behind
        with pytest.raises(DiskTierError, match="already stored"):
            store.write_blocks(a[:1], [10], blocks_for(a[:1], MODEL))
        store.delete([*a[:2], seq_hash("unknown", 0)])
        assert store.lookup(a[0]) is None
        with pytest.raises(DiskTierError, match="holds no block"):
            store.read_blocks([0])
        store.write_blocks(b[:2], [1, 0], blocks_for(b[:2], MODEL))
        out, bad = store.read_blocks([0, 1, 2, 3])
        assert bad == []
        assert same(out, blocks_for([b[1], b[0], a[2], a[3]], MODEL))

    def test_argument_checks(self, store: DiskStore) -> None:
        h = [seq_hash("x", 0)]
        with pytest.raises(DiskTierError, match="shaped"):
            store.write_blocks(h, [0], torch.zeros(1, 3, dtype=torch.float16))
        with pytest.raises(DiskTierError, match="outside"):
            store.write_blocks(h, [64], blocks_for(h, MODEL))
        with pytest.raises(DiskTierError, match="32 bytes"):
            store.write_blocks([b"short"], [0], blocks_for(h, MODEL))
        with pytest.raises(DiskTierError, match="distinct"):
            store.write_blocks(h + h, [0, 1], blocks_for(h + h, MODEL))

    def test_restart_warmth(self, tmp_path: Path) -> None:
        path = tmp_path / "t"
        hashes = [seq_hash("warm", i) for i in range(30)]
        with self.open(path, 40, durability="none") as s:
            s.write_blocks(hashes, list(range(5, 35)), blocks_for(hashes, MODEL))
            s.touch(hashes[:3])
            before = s.entries()
        with self.open(path, 40, durability="none") as s:
            after = s.entries()
            assert after == before  # rows, recency and hit counts survive
            out, bad = s.read_blocks([e.slot for e in after])
            assert bad == [] and same(out, blocks_for([e.hash for e in after], MODEL))
            loc = s.block_location(hashes[0])
            assert loc is not None
            file, offset, size = loc
            raw = (path / file).read_bytes()[offset : offset + size]
            assert raw == blocks_for(hashes[:1], MODEL).view(torch.uint8).numpy().tobytes()

    def test_second_writer_refused_and_readonly_alongside(self, tmp_path: Path) -> None:
        path = tmp_path / "t"
        child = subprocess.Popen(
            [PYTHON, CHILD, "hold", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        try:
            assert child.stdout is not None and child.stdin is not None
            line = child.stdout.readline().split()
            assert line[0] == "ready", line
            pid = line[1]
            with pytest.raises(DiskTierError, match=f"pid={pid}"):
                self.open(path, 64)
            with self.open(path, 64, readonly=True) as ro:
                assert ro.capacity == 64
                entries = ro.entries()
                assert len(entries) == 8
                out, bad = ro.read_blocks([e.slot for e in entries])
                assert bad == [] and same(out, blocks_for([e.hash for e in entries], MODEL))
                assert ro.verify() == []
                with pytest.raises(DiskTierError, match="read-only"):
                    ro.write_blocks([], [], blocks_for([], MODEL))
                child.stdin.write("go\n")
                child.stdin.flush()
                assert child.stdout.readline().strip() == "more"
                assert len(ro.entries()) == 16  # sees the live writer's new commits
                new = ro.lookup(seq_hash("hold2", 3))
                assert new is not None
                out, bad = ro.read_blocks([new.slot])
                assert bad == [] and same(out, blocks_for([new.hash], MODEL))
            child.stdin.close()
            assert child.wait(timeout=30) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        # The lock went with the child: a writer may open now.
        with self.open(path, 64) as s:
            assert len(s.entries()) == 16

    def test_second_writer_in_process_refused(self, store: DiskStore, tmp_path: Path) -> None:
        with pytest.raises(DiskTierError, match=f"pid={os.getpid()}"):
            self.open(tmp_path / "tier")

    @pytest.mark.parametrize(
        "change",
        [
            {"model": ODD_MODEL},
            {"algo": "xxh3_128"},
            {"namespace": "other-ns"},
        ],
    )
    def test_layout_mismatch_changes_nothing(self, tmp_path: Path, change: dict[str, object]) -> None:
        path = tmp_path / "t"
        hashes = [seq_hash("m", i) for i in range(4)]
        with self.open(path, 16) as s:
            s.write_blocks(hashes, [0, 1, 2, 3], blocks_for(hashes, MODEL))
        before = _snapshot(path)
        for readonly in (False, True):
            with pytest.raises(LayoutMismatchError) as info:
                self.open(path, 32, readonly=readonly, **change)  # type: ignore[arg-type]
            msg = str(info.value)
            if "model" in change:
                assert MODEL.fingerprint() in msg and ODD_MODEL.fingerprint() in msg
            elif "algo" in change:
                assert ALGO in msg and "xxh3_128" in msg
            else:
                assert NAMESPACE in msg and "other-ns" in msg
        assert _snapshot(path) == before
        with self.open(path, 16) as s:
            assert len(s.entries()) == 4

    def test_grow_and_shrink(self, tmp_path: Path) -> None:
        path = tmp_path / "t"
        hashes = [seq_hash("gs", i) for i in range(16)]
        with self.open(path, 16) as s:
            s.write_blocks(hashes, list(range(16)), blocks_for(hashes, MODEL))
        with self.open(path, 40) as s:  # grow
            assert s.capacity == 40
            more = [seq_hash("gs2", i) for i in range(8)]
            s.write_blocks(more, list(range(32, 40)), blocks_for(more, MODEL))
            # Make recency explicit: the most recently used are gs2 and gs[0:4].
            s.touch(hashes[:4])
            s.flush()
            keep = set(more) | set(hashes[:4])
        with self.open(path, 12) as s:  # shrink: survivors moved to low slots, LRU excess dropped
            assert s.capacity == 12
            entries = s.entries()
            assert {e.hash for e in entries} == keep
            assert all(e.slot < 12 for e in entries)
            out, bad = s.read_blocks([e.slot for e in entries])
            assert bad == [] and same(out, blocks_for([e.hash for e in entries], MODEL))
            sizes = [os.path.getsize(path / f) for f in s.stats()["data_files"]]
            assert sum(sizes) == 12 * s.stride
        with self.open(path, 12, readonly=True) as ro:
            assert ro.capacity == 12 and len(ro.entries()) == 12 and ro.verify() == []

    def test_verify_and_repair(self, tmp_path: Path) -> None:
        path = tmp_path / "t"
        hashes = [seq_hash("v", i) for i in range(6)]
        with self.open(path, 16) as s:
            s.write_blocks(hashes, list(range(6)), blocks_for(hashes, MODEL))
            file, offset, _ = s.block_location(hashes[2]) or ("", 0, 0)
        with open(path / file, "r+b") as f:  # flip a byte behind the store's back
            f.seek(offset + 100)
            b = f.read(1)
            f.seek(offset + 100)
            f.write(bytes([b[0] ^ 0x5A]))
        with self.open(path, 16, readonly=True) as ro:
            assert ro.verify() == [hashes[2]]
            with pytest.raises(DiskTierError):
                ro.verify(repair=True)
        with self.open(path, 16) as s:
            assert s.verify() == [hashes[2]]
            assert s.lookup(hashes[2]) is not None  # verify without repair changes nothing
            assert s.verify(repair=True) == [hashes[2]]
            assert s.lookup(hashes[2]) is None and s.corrupt_count == 1
            assert s.verify() == []

    def test_closed_store_refuses(self, tmp_path: Path) -> None:
        s = self.open(tmp_path / "t", 8)
        s.close()
        s.close()  # idempotent
        with pytest.raises(DiskTierError, match="closed"):
            s.read_blocks([0])


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
