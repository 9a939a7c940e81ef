"""Conformance tests every disk backend passes (zarr's ``StoreTests`` for ``tiered_kv.storage.disk``).

A backend moves a store's bytes (``PosixBackend`` buffered or O_DIRECT, ``KvikioBackend``, wrappers such as
``FaultInjectingBackend``). Under a real :class:`~tiered_kv.storage.disk.DiskStore` the suite checks: round trips of
every dtype at every durability (padded slots included), many slots and registry entries, overwrite after delete,
argument checks, restart warmth (rows, recency, hit counts and bytes survive), one writer at a time (a second
writer, in a child process or this one, is refused; read-only openers see the writer's commits), layout mismatch
changes nothing on disk, grow and shrink, verify and repair of a flipped byte, and a closed store refusing calls.
Expected bytes come from the hash (:func:`block_bytes`), never from the store.

Run it on your backend::

    from tiered_kv.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        def make_backend(self) -> DiskBackend:
            return MyBackend()

Needs pytest (``pip install tiered_kv[testing]``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ..config import DiskConfig, ModelConfig
from ..errors import DiskTierError, LayoutMismatchError
from ..storage.disk import DiskBackend, DiskStore
from ._data import blocks_for as _blocks_for
from ._data import same, seq_hash

__all__ = ["ALGO", "BackendConformance", "MODEL", "NAMESPACE", "ODD_MODEL", "blocks_for", "disk_config"]

#: 2 layers x 2 x 16 tokens x 256 x fp16 = 32 KiB blocks (a multiple of 4 KiB: O_DIRECT writes in place).
MODEL = ModelConfig(num_layers=2, inner_dim=256, page_size=16, dtype="float16")
#: 2 x 2 x 4 x 96 x bf16 = 3 KiB blocks: not a multiple of 4 KiB (exercises the padded slot path).
ODD_MODEL = ModelConfig(num_layers=2, inner_dim=96, page_size=4, dtype="bfloat16")
ALGO = "sha256"
NAMESPACE = "test-ns"


def blocks_for(hashes: list[bytes], model: ModelConfig) -> torch.Tensor:
    """``[n, *block_shape]``: each block's bytes are a function of its hash."""
    return _blocks_for(hashes, model)


def disk_config(path: str | os.PathLike[str], num_blocks: int, durability: str = "batch") -> DiskConfig:
    """A posix-backend disk config (the store gets its backend from the suite, not from the config)."""
    return DiskConfig(path=os.fspath(path), num_blocks=num_blocks, backend="posix", durability=durability)


def _child_env() -> dict[str, str]:
    """Environment for a child Python that imports this tiered_kv (wherever it was imported from)."""
    import tiered_kv

    env = dict(os.environ)
    root = str(Path(tiered_kv.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file of a tier except LMDB's reader table (lock.mdb)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != "lock.mdb":
            out[str(p.relative_to(path))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


class BackendConformance:
    """Conformance tests for a :class:`~tiered_kv.storage.disk.DiskBackend` under the disk store.

    Subclasses provide :meth:`make_backend` (a new backend per store); everything else is shared. See the module
    docstring.
    """

    def make_backend(self) -> DiskBackend:
        """A new backend instance for one store."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_backend()")

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
        """Open (or create) a store at ``path`` on :meth:`make_backend`."""
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
        """A fresh store of 64 blocks of :data:`MODEL`."""
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

    def test_checksums_are_the_callers_bytes(self, store: DiskStore) -> None:
        # Whichever thread computes them (I/O workers, or the caller), a row's checksum is xxh3-64 of the bytes
        # the caller handed in, and a read verifies against it.
        import xxhash

        hashes = [seq_hash("csum", i) for i in range(12)]
        data = blocks_for(hashes, MODEL)
        store.write_blocks(hashes, list(range(12)), data)
        rows = {e.hash: e for e in store.entries()}
        flat = data.contiguous().view(torch.uint8).reshape(len(hashes), -1)
        for i, h in enumerate(hashes):
            assert rows[h].checksum == xxhash.xxh3_64_intdigest(flat[i].numpy().tobytes())
        assert store.read_blocks(list(range(12)))[1] == []

    def test_reads_into_host_byte_rows(self, store: DiskStore) -> None:
        # One 1-D uint8 numpy row per block (a host arena's TensorArena.byte_rows): read in place, verified, for a
        # backend that takes numpy buffers and, converted, for one that takes tensors only.
        import numpy as np

        hashes = [seq_hash("rows", i) for i in range(10)]
        data = blocks_for(hashes, MODEL)
        store.write_blocks(hashes, list(range(20, 30)), data)
        arena = np.zeros((12, MODEL.block_size_bytes), dtype=np.uint8)
        order = [9, 0, 4, 7]
        bad = store.read_into([20 + i for i in order], [arena[k] for k in range(4)])
        assert bad == []
        want = data.contiguous().view(torch.uint8).reshape(10, -1)
        for k, i in enumerate(order):
            assert same(torch.from_numpy(arena[k]), want[i])
        assert not arena[4:].any()  # nothing written outside the rows handed over
        with pytest.raises(DiskTierError, match="1-D uint8 array"):
            store.read_into([20], [np.zeros(MODEL.block_size_bytes - 1, dtype=np.uint8)])
        with pytest.raises(DiskTierError, match="1-D uint8 array"):
            store.read_into([20], [np.zeros(MODEL.block_size_bytes, dtype=np.int16)])
        with pytest.raises(DiskTierError, match="1-D uint8 array"):
            store.read_into([20], [np.zeros(2 * MODEL.block_size_bytes, dtype=np.uint8)[::2]])  # strided

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
            [sys.executable, "-m", "tiered_kv.testing._disk_child", "hold", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_child_env(),
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
