"""KvBlockManager with the disk tier: demotion to disk, promotion from disk, restart warmth, corruption."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from kvdata import SMALL, block_data, content_for, fill, store

from tiered_kv import (
    DiskConfig,
    DiskTierError,
    KvBlockManager,
    KvBlockManagerConfig,
    LayoutConfig,
    LayoutMismatchError,
    ModelConfig,
)


def config(path: Path, **kw: object) -> KvBlockManagerConfig:
    args: dict = {
        "model": SMALL,
        "device": LayoutConfig(num_blocks=4),
        "host": LayoutConfig(num_blocks=4),
        "disk": DiskConfig(path=str(path), num_blocks=32, backend="posix"),
        "device_type": "cpu",
    }
    args.update(kw)
    return KvBlockManagerConfig(**args)


def check(blocks: list) -> None:
    for b in blocks:
        assert torch.equal(block_data(b), content_for(b.sequence_hash)), b


def test_blocks_travel_to_disk_and_back(tmp_path: Path) -> None:
    with KvBlockManager(config(tmp_path)) as bm:
        hs = bm.sequence_hashes(list(range(4 * 16)))
        store(bm, hs)
        bm.flush()
        disk = bm.disk()
        # 16 blocks - 4 device - 4 host at least; the cleaner may have copied more ahead of need (inclusive tiers)
        assert disk is not None and len(disk) >= 8
        assert all(h in disk or h in bm.host() or h in bm.top for h in hs)  # type: ignore[operator]
        got = bm.match_sequence_hashes(hs)
        assert [b.sequence_hash for b in got] == hs[:4]
        assert all(b.tier == "device" for b in got)
        check(got)
        bm.top.release_blocks(got)
        assert bm.metrics()["disk"]["hits"] >= 4


def test_restart_is_warm_in_a_new_process(tmp_path: Path) -> None:
    with KvBlockManager(config(tmp_path)) as bm:
        hs = bm.sequence_hashes(list(range(4 * 16)))
        store(bm, hs)
        bm.flush()
    on_disk = set(bm.disk().cached_hashes())  # type: ignore[union-attr]  # after close: the cleaner has stopped
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from kvdata import SMALL, block_data, content_for
        from tiered_kv import *
        cfg = KvBlockManagerConfig(model=SMALL, disk=DiskConfig(path={str(tmp_path)!r}, num_blocks=32,
                                   backend="posix"), device_type="cpu")
        with KvBlockManager(cfg) as bm:
            hs = bm.sequence_hashes(list(range(4 * 16)))
            got = bm.match_sequence_hashes(hs)
            assert all(torch.equal(block_data(b), content_for(b.sequence_hash)) for b in got)
            print(len(got), len(bm.disk()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[1]) == len(on_disk) >= 8
    prefix = 0
    while prefix < len(hs) and hs[prefix] in on_disk:
        prefix += 1
    assert int(out[0]) == prefix >= 8  # the first 8 blocks were demoted to disk, in order


def test_mismatch_refused_and_nothing_changed(tmp_path: Path) -> None:
    with KvBlockManager(config(tmp_path)) as bm:
        store(bm, bm.sequence_hashes(list(range(4 * 12))))
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file() and p.name != "writer.lock"}
    other = ModelConfig(num_layers=3, inner_dim=8, page_size=4, dtype="float32")
    for kw, needle in (({"model": other}, "fingerprint"), ({"hash_algorithm": "xxh3_128"}, "xxh3_128"),
                       ({"namespace": "other-model"}, "other-model")):
        with pytest.raises(LayoutMismatchError, match=needle):
            KvBlockManager(config(tmp_path, **kw))
    after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file() and p.name != "writer.lock"}
    assert before.keys() == after.keys()
    for p in before:
        if "registry" not in str(p):  # LMDB's lock file records readers; the data and rows must be unchanged
            assert before[p] == after[p], p


def test_second_writer_refused(tmp_path: Path) -> None:
    with KvBlockManager(config(tmp_path)), pytest.raises(DiskTierError, match=str(os.getpid())):
        KvBlockManager(config(tmp_path))


def test_corrupt_disk_block_is_a_miss_and_dropped(tmp_path: Path) -> None:
    with KvBlockManager(config(tmp_path, device=None, host=None)) as bm:
        hs = bm.sequence_hashes(list(range(4 * 6)))
        store(bm, hs)
        bm.flush()
        disk = bm.disk()
        assert disk is not None
        store_ = disk.storage.store  # type: ignore[attr-defined]
        rel, offset, _size = store_.block_location(hs[2])
    with open(tmp_path / rel, "r+b") as f:  # flip a byte of block 2 behind the tier's back
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    cfg = config(tmp_path, device=LayoutConfig(num_blocks=8), host=None)
    with KvBlockManager(cfg) as bm:
        got = bm.match_sequence_hashes(hs)
        assert [b.sequence_hash for b in got] == hs[:2]  # the match ends at the corrupt block
        check(got)
        bm.top.release_blocks(got)
        assert bm.metrics()["offload"]["corrupt_blocks"] >= 1
        assert hs[2] not in bm.disk()  # type: ignore[operator]
        again = bm.match_sequence_hashes(hs)
        assert len(again) == 2
        bm.top.release_blocks(again)


def test_persist_writes_memory_tiers_to_disk(tmp_path: Path) -> None:
    no_writeback = DiskConfig(path=str(tmp_path), num_blocks=32, backend="posix", writeback_s=None)
    with KvBlockManager(config(tmp_path, disk=no_writeback)) as bm:
        hs = bm.sequence_hashes(list(range(4 * 4)))
        store(bm, hs)  # 4 blocks: they fit in the device tier, nothing was demoted
        assert bm.persist() >= 1
    with KvBlockManager(config(tmp_path, device=None, host=None)) as bm:
        got = bm.match_sequence_hashes(hs)
        assert len(got) == 4
        check(got)
        bm.top.release_blocks(got)


def test_persist_races_no_cleaner_into_evicting_its_own_copies(tmp_path: Path) -> None:
    # Found by tools/bench_ttft.py: persist and the cleaner copied the same blocks at once, and the surplus
    # allocations on a nearly full disk tier evicted the prefix that had just been written.
    cfg = config(tmp_path, device=LayoutConfig(num_blocks=520), host=None,
                 disk=DiskConfig(path=str(tmp_path), num_blocks=520, backend="posix"))
    with KvBlockManager(cfg) as bm:
        hs = bm.sequence_hashes(list(range(4 * 508)))
        blocks = bm.top.allocate_blocks(508)
        for b, h in zip(blocks, hs):
            fill(b, h)
        bm.top.release_blocks(bm.top.register_blocks(blocks, hs))
        bm.persist()
        assert bm.metrics()["disk"]["evictions"] == 0
    with KvBlockManager(config(tmp_path, device=None, host=None,
                               disk=DiskConfig(path=str(tmp_path), num_blocks=520, backend="posix"))) as bm:
        got = bm.match_sequence_hashes(hs)
        assert len(got) == 508
        bm.top.release_blocks(got)
