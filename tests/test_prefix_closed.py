"""Prefix-closed durability (issue 13): after a crash or a burst, what is on disk is reachable."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import prefix_scenarios as sc
import pytest
import torch
from kvdata import SMALL, content_for, fill

from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, LayoutConfig, OffloadConfig
from tiered_kv.storage.disk import DiskStore

HERE = Path(__file__).resolve().parent


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "prefix_scenarios.py"), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
    )


def _wait_line(proc: subprocess.Popen[str], want: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != want:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"child said {line!r} instead of {want!r}; stderr:\n{err[-3000:]}")


def _kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _on_disk(path: Path, cfg: KvBlockManagerConfig) -> set[bytes]:
    assert cfg.disk is not None
    with DiskStore(cfg.disk, cfg.model, hash_algorithm=cfg.hash_algorithm, namespace=cfg.namespace,
                   readonly=True) as store:
        return {e.hash for e in store.entries()}


@pytest.mark.slow
def test_a_hot_shared_prefix_survives_kill_9(tmp_path: Path) -> None:
    path = str(tmp_path / "kv")
    proc = _child("users", path)
    _wait_line(proc, "written")  # the child waited for its background writeback (no flush, no persist)
    _kill9(proc)
    cfg = sc.users_config(path)
    with KvBlockManager(cfg) as bm:
        matched = total = 0
        for u in range(sc.N_USERS):
            hs = bm.sequence_hashes(sc.user_tokens(u))
            got = bm.match_sequence_hashes(hs)
            for b in got[-4:]:  # spot-check bytes at the end of each matched prefix
                data = torch.stack([torch.stack([b.layer_view(la, o) for o in range(2)]) for la in range(2)])
                assert torch.equal(data, sc.content(b.sequence_hash, sc.USERS_MODEL))
            matched += len(got)
            total += len(hs)
            bm.top.release_blocks(got)
    assert total == 3360
    assert matched >= 0.95 * total, f"{matched} of {total} blocks matched after kill -9"


def _prefix_closed(on_disk: set[bytes], chain: list[bytes]) -> int:
    """How many of ``chain`` are on disk, after checking that they are exactly its first k blocks."""
    k = sum(1 for h in chain if h in on_disk)
    assert all(h in on_disk for h in chain[:k]), f"{k} blocks of the chain on disk, not its first {k}"
    return k


@pytest.mark.slow
@pytest.mark.parametrize("end", ["flush", "kill"])
def test_a_burst_leaves_a_prefix_closed_disk(tmp_path: Path, end: str) -> None:
    path = str(tmp_path / "kv")
    proc = _child("burst", path, end)
    if end == "kill":
        _wait_line(proc, "registered")
        _kill9(proc)
    else:
        _wait_line(proc, "closed")
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    cfg = sc.burst_config(path)
    with KvBlockManager(cfg) as bm:  # opening removes what a crash left unreachable
        chain = bm.sequence_hashes(sc.burst_tokens())
    on_disk = _on_disk(tmp_path / "kv", cfg)
    k = _prefix_closed(on_disk, chain)
    assert len(on_disk) == k  # nothing else is on disk
    if end == "flush":
        assert k >= 600, f"only {k} of 768 disk blocks used"


def _small(tmp_path: Path, **disk: object) -> KvBlockManagerConfig:
    return KvBlockManagerConfig(
        model=SMALL, device=LayoutConfig(num_blocks=8), host=LayoutConfig(num_blocks=8),
        disk=DiskConfig(path=tmp_path / "kv", num_blocks=64, backend="posix", **disk),  # type: ignore[arg-type]
        eviction="lru", device_type="cpu",
    )


def _register(bm: KvBlockManager, hashes: list[bytes]) -> None:
    top = bm.top
    blocks = top.allocate_blocks(len(hashes))
    for b, h in zip(blocks, hashes):
        fill(b, h)
    top.release_blocks(top.register_blocks(blocks, hashes))


def test_writeback_reaches_disk_without_persist_and_close_keeps_it(tmp_path: Path) -> None:
    cfg = _small(tmp_path, writeback_s=0.2)
    with KvBlockManager(cfg) as bm:
        hs = bm.sequence_hashes(list(range(4 * 6)))
        _register(bm, hs)
        assert bm.scheduler.wait_for_writeback(timeout=30.0)
        disk = bm.disk()
        assert disk is not None and all(h in disk for h in hs)  # written while still in the device tier
        assert all(h in bm.device() for h in hs)  # type: ignore[operator]  # the memory copy stays
        assert bm.metrics()["offload"]["written_back"] == 6
    with KvBlockManager(cfg) as bm:
        got = bm.match_sequence_hashes(hs)
        assert [b.sequence_hash for b in got] == hs
        assert all(torch.equal(b.layer_view(1, 1), content_for(b.sequence_hash)[1, 1]) for b in got)
        bm.top.release_blocks(got)


def test_writeback_waits_for_blocks_to_age_and_writes_from_the_lowest_memory_tier(tmp_path: Path) -> None:
    cfg = replace(_small(tmp_path, writeback_s=60.0), offload=OffloadConfig(background_cleaning=False))
    with KvBlockManager(cfg) as bm:
        hs = bm.sequence_hashes(list(range(4 * 8)))  # the device tier full: the cleaner has work
        _register(bm, hs)
        sched = bm.scheduler
        # Young blocks wait: a pass that writes only what it has seen for an hour writes nothing, keeps them all.
        assert sched.writeback_now(min_age_s=3600.0) == 0
        assert sched.writeback_pending() == 8
        # The cleaner copies the device tier's next victims into the host tier; they stay in the device tier too.
        cleaned = bm.run_cleaner_once("device")
        host, device = bm.host(), bm.device()
        assert host is not None and device is not None
        in_host = [h for h in hs if h in host]
        assert cleaned == len(in_host) > 0 and all(h in device for h in hs)
        assert sched.writeback_now() == 8
        pairs = bm.metrics()["offload"]["per_pair"]
        # Each block is written once, from the host copy where there is one (a held device block is room lost).
        assert pairs.get("host->disk", 0) == len(in_host)
        assert pairs.get("device->disk", 0) == 8 - len(in_host)
        assert sched.writeback_pending() == 0
    assert _on_disk(tmp_path / "kv", cfg) == set(hs)


def test_close_finishes_the_writeback(tmp_path: Path) -> None:
    cfg = _small(tmp_path, writeback_s=60.0)  # the background pass would not run before close
    with KvBlockManager(cfg) as bm:
        hs = bm.sequence_hashes(list(range(4 * 5)))
        _register(bm, hs)
    assert _on_disk(tmp_path / "kv", cfg) == set(hs)


def test_without_writeback_memory_tiers_stay_in_memory(tmp_path: Path) -> None:
    cfg = _small(tmp_path, writeback_s=None)
    with KvBlockManager(cfg) as bm:
        hs = bm.sequence_hashes(list(range(4 * 5)))
        _register(bm, hs)
    assert _on_disk(tmp_path / "kv", cfg) == set()


def test_stored_events_carry_parents(tmp_path: Path) -> None:
    cfg = _small(tmp_path, writeback_s=None)
    seen = []
    with KvBlockManager(cfg) as bm:
        bm.subscribe(seen.append)
        hs = bm.sequence_hashes(list(range(4 * 3)))
        _register(bm, hs)
        bm.close()  # delivers what is queued
    stored = [e for e in seen if e.kind == "stored" and e.tier == "device"]
    assert stored and stored[0].sequence_hashes == tuple(hs)
    assert stored[0].parents == (None, hs[0], hs[1])


def test_a_chain_longer_than_the_disk_keeps_its_head(tmp_path: Path) -> None:
    # One chain of 12 through a disk tier of 8 (the only tier): the disk keeps the head, never a tail without it.
    cfg = KvBlockManagerConfig(
        model=SMALL, disk=DiskConfig(path=tmp_path / "kv", num_blocks=8, backend="posix", writeback_s=None),
        eviction="lru", device_type="cpu",
    )
    with KvBlockManager(cfg) as bm:
        hs = bm.sequence_hashes(list(range(4 * 12)))
        for i in range(0, 12, 2):
            _register(bm, hs[i : i + 2])
        disk = bm.disk()
        assert disk is not None
        # Room for h8, h9 is made from the chain's tail (h7, h6), never its head; h8..h11 then have no parent on
        # disk and are not kept (they could never be matched).
        assert [h in disk for h in hs] == [True] * 6 + [False] * 6
        assert disk.metrics.orphans_refused == 4


def test_a_lost_parent_takes_its_descendants_with_it(tmp_path: Path) -> None:
    cfg = _small(tmp_path, writeback_s=None)
    with KvBlockManager(cfg) as bm:
        hs = bm.sequence_hashes(list(range(4 * 6)))
        _register(bm, hs)
        bm.persist()
        bm.reset(tiers=["device", "host"])  # the disk holds the only copies now
        disk = bm.disk()
        assert disk is not None and all(h in disk for h in hs)
        disk.invalidate([hs[2]], corrupt=True)  # e.g. failed its checksum: the chain is cut there
        bm.flush()
        assert [h in disk for h in hs] == [True, True, False, False, False, False]
        assert bm.metrics()["offload"]["reaped"] == 3


def test_replay_reports_disk_write_amplification_with_and_without_writeback(tmp_path: Path) -> None:
    from tiered_kv.stress.replay import ReplayOptions, replay_trace
    from tiered_kv.stress.tracegen import generate_trace

    trace = tmp_path / "trace.jsonl"
    generate_trace(trace, 60, seed=1)
    reports = {
        wb: replay_trace(trace, ReplayOptions(device_blocks=32, host_blocks=64, disk_blocks=256, writeback_s=wb))
        for wb in (None, 0.2)
    }
    for wb, rep in reports.items():
        assert rep["ok"] and rep["config"]["writeback_s"] == wb
        pairs, bb = rep["per_pair_blocks"], rep["config"]["block_bytes"]
        written = sum(n for pair, n in pairs.items() if pair.endswith("->disk")) * bb
        assert rep["bytes_written_disk"] == written > 0
        assert rep["bytes_registered"] > 0
        assert rep["disk_write_amplification"] == round(written / rep["bytes_registered"], 4)
    # Writeback copies blocks the device tier still holds down to the disk (at the latest at the final flush).
    assert reports[0.2]["per_pair_blocks"].get("device->disk", 0) > 0
