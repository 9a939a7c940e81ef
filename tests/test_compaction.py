"""Disk compaction (pool, store and CLI) and token ids persisted on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from kvdata import SMALL, block_data, content_for, fill

from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig


def disk_only(path: Path, n: int = 64) -> KvBlockManagerConfig:
    return KvBlockManagerConfig(
        model=SMALL, disk=DiskConfig(path=str(path), num_blocks=n, backend="posix"), device_type="cpu"
    )


def data_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("data-*.bin"))


def fill_disk(bm: KvBlockManager, hs: list[bytes], tokens: list[list[int]] | None = None) -> None:
    disk = bm.disk()
    assert disk is not None
    blocks = disk.allocate_blocks(len(hs))
    for b, h in zip(blocks, hs):
        fill(b, h)
    disk.release_blocks(disk.register_blocks(blocks, hs, tokens))


def test_pool_compaction_moves_blocks_down_and_shrinks_files(tmp_path: Path) -> None:
    with KvBlockManager(disk_only(tmp_path)) as bm:
        disk = bm.disk()
        assert disk is not None
        # Independent blocks (plain bytes: chain heads): dropping some leaves the others reachable.
        hs = [bytes(h) for h in bm.sequence_hashes(list(range(4 * 48)))]
        fill_disk(bm, hs)
        disk.invalidate(hs[:40])  # free the low slots: 8 live blocks sit in high slots
        held = disk.match_sequence_hashes(hs[40:41])  # a held block must not move
        bm.flush()
        before = data_bytes(tmp_path)
        moved = disk.compact()
        assert moved == 7
        assert data_bytes(tmp_path) < before
        assert held[0].block_id == disk._by_hash[hs[40]]
        got = disk.match_sequence_hashes(hs[41:])
        assert len(got) == 7 and max(b.block_id for b in got) < 8
        for b in got + held:
            assert torch.equal(block_data(b), content_for(b.sequence_hash))
        disk.release_blocks(got + held)
        more = bm.sequence_hashes(list(range(10_000, 10_000 + 4 * 40)))
        fill_disk(bm, more)  # the files grow again on demand
        got = disk.match_sequence_hashes(more)
        assert all(torch.equal(block_data(b), content_for(b.sequence_hash)) for b in got)
        disk.release_blocks(got)
    with KvBlockManager(disk_only(tmp_path)) as again:
        disk = again.disk()
        assert disk is not None and len(disk) == 48
        got = disk.match_sequence_hashes(hs[41:])
        assert all(torch.equal(block_data(b), content_for(b.sequence_hash)) for b in got)
        disk.release_blocks(got)


def test_cli_compact(tmp_path: Path) -> None:
    with KvBlockManager(disk_only(tmp_path)) as bm:
        # Plain bytes: chain heads, so dropping the first 24 leaves no orphans for `disk verify` to report.
        hs = [bytes(h) for h in bm.sequence_hashes(list(range(4 * 32)))]
        fill_disk(bm, hs)
        bm.disk().invalidate(hs[:24])  # type: ignore[union-attr]
    exe = Path(sys.executable).parent / "tiered-kv"
    res = subprocess.run([str(exe), "disk", "compact", str(tmp_path), "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["moved"] == 8
    res = subprocess.run([str(exe), "disk", "verify", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    with KvBlockManager(disk_only(tmp_path)) as bm:
        got = [b for h in hs[24:] for b in bm.match_sequence_hashes([h])]
        assert all(torch.equal(block_data(b), content_for(b.sequence_hash)) for b in got)
        bm.top.release_blocks(got)
        # This process holds the writer lock: compact refuses with one line and exit 3.
        res = subprocess.run([str(exe), "disk", "compact", str(tmp_path)], capture_output=True, text=True)
        assert res.returncode == 3 and res.stderr.count("\n") == 1


def test_tokens_survive_a_restart(tmp_path: Path) -> None:
    toks = list(range(8))
    with KvBlockManager(disk_only(tmp_path)) as bm:
        hs = bm.sequence_hashes(toks)
        fill_disk(bm, hs, [toks[:4], toks[4:]])
    with KvBlockManager(disk_only(tmp_path)) as bm:
        got = bm.match_sequence_hashes(hs, tokens=toks)
        assert len(got) == 2
        bm.top.release_blocks(got)
        got = bm.match_sequence_hashes(hs, tokens=[0, 1, 2, 3, 4, 5, 6, 99])
        assert len(got) == 1  # the stored ids of block 1 differ: a miss
        bm.top.release_blocks(got)
