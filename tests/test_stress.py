"""The stress and replay commands: smoke runs of every mode (real subprocesses), the harness catching planted
bugs, trace replay, and unit tests of the pieces. Longer runs are under the ``stress`` marker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tiered_kv import KvBlockManager, KvBlockManagerConfig, LayoutConfig
from tiered_kv.stress.content import BlockContent
from tiered_kv.stress.durability import verify_disk
from tiered_kv.stress.options import StressOptions
from tiered_kv.stress.replay import block_hashes, iter_trace
from tiered_kv.stress.stats import Histogram, Stats
from tiered_kv.stress.tracegen import generate_trace
from tiered_kv.stress.workload import ConversationWorkload, WorkloadShape

MOONCAKE = Path("/work/shared/traces/mooncake_conversation.jsonl")
REQUIRED = ("ops", "blocks_verified", "wrong", "lost", "crashes", "faults_injected", "faults_detected", "hit_rate",
            "demotions", "promotions", "throughput_ops_s", "match_p50_ms", "match_p99_ms", "allocate_p50_ms",
            "allocate_p99_ms")


def _run(*args: str, timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    """Run ``python -m tiered_kv.stress ARGS --json``; returns (exit code, the last stdout line as JSON, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tiered_kv.stress", *args, "--json"],
        capture_output=True, text=True, timeout=timeout,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr: {proc.stderr[-2000:]}"
    return proc.returncode, json.loads(lines[-1]), proc.stderr


# ------------------------------------------------------------------------------------------------ smoke runs
def test_stress_smoke_in_process(tmp_path: Path) -> None:
    rc, rep, err = _run("stress", "--path", str(tmp_path), "--duration", "2.5")
    assert rc == 0, (rep, err)
    for key in REQUIRED:
        assert key in rep
    assert rep["ok"] and rep["wrong"] == 0 and rep["lost"] == 0
    assert rep["ops"] > 0 and rep["blocks_verified"] > 0
    # The default tiers are small enough that blocks go all the way down and come back up.
    assert rep["demotions"] > 0 and rep["promotions"] > 0
    assert rep["evictions"]["host"] > 0
    assert all(rep["verified_per_tier"][t] > 0 for t in ("device", "host", "disk"))


def test_stress_smoke_faults(tmp_path: Path) -> None:
    rc, rep, err = _run("stress", "--path", str(tmp_path), "--duration", "2.5", "--faults", "0.05")
    # The verdict's counters in full (a dict in the message would be cut short): it once failed with ok False
    # because a reader thread died (a disk store race, since fixed); a died thread's example says where.
    verdict = {k: rep.get(k) for k in ("ok", "wrong", "lost", "client_failures", "not_prefix_closed", "unreachable",
                                       "faults_injected", "faults_detected", "examples")}
    assert rc == 0, f"{verdict} {err[-2000:]}"
    assert rep["wrong"] == 0 and rep["lost"] == 0
    assert rep["faults_injected"] > 0
    assert rep["faults_detected"] > 0
    assert rep["ops"] > 0


def test_stress_smoke_kill(tmp_path: Path) -> None:
    rc, rep, err = _run("stress", "--path", str(tmp_path), "--duration", "5", "--kill-every", "1.5")
    assert rc == 0, (rep, err)
    assert rep["crashes"] >= 1
    assert rep["lives"] == rep["crashes"] + 1 or rep["lives"] == rep["crashes"]
    assert rep["wrong"] == 0 and rep["lost"] == 0
    assert rep["blocks_verified"] > 0
    assert rep["evictions"]["disk"] == 0  # kill mode never lets the disk evict (see tiered_kv.stress.child)


# ------------------------------------------------------------------------------------------ the harness itself
def test_planted_wrong_block_fails_the_run(tmp_path: Path) -> None:
    rc, rep, _ = _run("stress", "--path", str(tmp_path), "--duration", "2", "--plant-bug", "wrong-bytes")
    assert rc == 1
    assert rep["wrong"] > 0 and not rep["ok"]
    assert rep["examples"]


def test_planted_lost_block_fails_the_run(tmp_path: Path) -> None:
    rc, rep, _ = _run("stress", "--path", str(tmp_path), "--duration", "2", "--plant-bug", "lose-blocks")
    assert rc == 1
    assert rep["lost"] > 0 and rep["wrong"] == 0


def test_bad_option_is_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tiered_kv.stress", "stress", "--path", str(tmp_path), "--faults", "2"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "faults" in proc.stderr


# ------------------------------------------------------------------------------------------------------ replay
@pytest.mark.skipif(not MOONCAKE.exists(), reason="Mooncake trace not available")
def test_replay_mooncake_head(tmp_path: Path) -> None:
    head = tmp_path / "head.jsonl"
    with MOONCAKE.open() as src:
        head.write_text("".join(next(src) for _ in range(200)))
    rc, rep, err = _run("replay", str(head), "--device-blocks", "128", "--host-blocks", "512", "--disk-blocks",
                        "2048")
    assert rc == 0, err
    assert rep["requests"] == 200 and rep["wrong"] == 0
    assert set(rep["hit_rate"]) == {"device", "host", "disk"}
    assert rep["blocks_verified"] > 0 and rep["bytes_demoted"] > 0
    assert 0.0 < rep["prefix_hit_rate"] <= rep["ideal_hit_rate"] + 1e-9


def test_replay_generated_trace(tmp_path: Path) -> None:
    out = tmp_path / "gen.jsonl"
    rc, rep, err = _run("replay", "--generate", str(out), "--requests", "300", "--seed", "3")
    assert rc == 0, err
    assert rep == {"generated": str(out), "requests": 300}
    rc, rep, err = _run("replay", str(out), "--device-blocks", "64", "--host-blocks", "128", "--disk-blocks", "1024",
                        "--limit", "250")
    assert rc == 0, err
    assert rep["requests"] == 250 and rep["wrong"] == 0
    assert rep["prefix_hit_rate"] > 0.3
    assert rep["served_from"]["disk"] > 0 and rep["bytes_read_disk"] > 0


def test_replay_rejects_a_bad_trace(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10}\n')
    proc = subprocess.run([sys.executable, "-m", "tiered_kv.stress", "replay", str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "bad.jsonl:1" in proc.stderr


# ------------------------------------------------------------------------------------------------------ pieces
def test_block_content_is_a_function_of_the_hash() -> None:
    opts = StressOptions(path="/nonexistent")
    content = BlockContent(opts.model())
    a, b = content.expected(b"a" * 32), content.expected(b"b" * 32)
    assert len(a) == opts.model().block_size_bytes
    assert (a == content.expected(b"a" * 32)).all()
    assert (a != b).mean() > 0.9
    half = a.copy()
    half[len(a) // 2 :] = b[len(a) // 2 :]
    assert content.matches_data(__import__("torch").from_numpy(half).view(1, -1), [b"a" * 32]) == [0]


def test_workload_contexts_grow_and_share_prefixes() -> None:
    from tiered_kv import compute_sequence_hashes

    shape = WorkloadShape(conversations=4, system_prompts=1, system_blocks=2, turn_blocks=1, max_context_blocks=4,
                          document_rate=0.0)
    wl = ConversationWorkload(shape, 1, 4, lambda t: compute_sequence_hashes(list(t), 4))
    s = wl.sessions
    first, second = s.next_turn(0), s.next_turn(0)
    assert len(first) == 3 and second[:3] == first and len(second) == 4
    assert s.next_turn(0)[:2] == first[:2] and len(s.next_turn(1)) == 3  # new session, same system prompt
    assert s.next_turn(1)[:2] == first[:2]


def test_trace_generator_and_block_split(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    generate_trace(out, 50, seed=1)
    reqs = list(iter_trace(out))
    assert len(reqs) == 50
    assert all(set(r) == {"timestamp", "input_length", "output_length", "hash_ids"} for r in reqs)
    assert [r["timestamp"] for r in reqs] == sorted(r["timestamp"] for r in reqs)
    r = {"hash_ids": [7, 8], "input_length": 512 + 300}
    hs = block_hashes(r, 128, 512)
    assert len(hs) == 4 + 2 and len(set(hs)) == 6 and all(len(h) == 32 for h in hs)
    assert block_hashes({"hash_ids": [7], "input_length": 512}, 128, 512) == hs[:4]


def test_histogram_and_stats_round_trip() -> None:
    h = Histogram()
    for ms in range(1, 101):
        h.observe(ms / 1000)
    assert 0.04 <= h.quantile(0.5) <= 0.07 and 0.09 <= h.quantile(0.99) <= 0.13
    s = Stats()
    s.add("ops", 3)
    s.match_latency.observe(0.001)
    t = Stats.from_dict(json.loads(json.dumps(s.to_dict())))
    assert t["ops"] == 3 and t.match_latency.count == 1


def test_verify_disk_finds_wrong_and_lost_blocks(tmp_path: Path) -> None:
    opts = StressOptions(path=str(tmp_path), device_blocks=4, host_blocks=4, disk_blocks=64)
    content = BlockContent(opts.model())
    hashes = [bytes([i]) * 32 for i in range(6)]
    with KvBlockManager(opts.config(disk_only=True)) as bm:
        disk = bm.disk()
        assert disk is not None
        new = disk.allocate_blocks(len(hashes))
        for blk, h in zip(new, hashes):
            content.fill(blk, h if h != hashes[2] else hashes[3])  # hashes[2] gets another block's bytes
        disk.release_blocks(disk.register_blocks(new, hashes))
        bm.flush()
    with KvBlockManager(opts.config(disk_only=True)) as bm:
        check = verify_disk(bm, content, [*hashes, b"\xee" * 32])
    assert check.verified == 6 and check.wrong == 1 and check.lost == 1


# ------------------------------------------------------------------------------------------------- long runs
@pytest.mark.stress
def test_stress_long_in_process(tmp_path: Path) -> None:
    rc, rep, err = _run("stress", "--path", str(tmp_path), "--duration", "30", "--threads", "8", "--tasks", "4",
                        timeout=300)
    assert rc == 0, (rep, err)


@pytest.mark.stress
def test_stress_long_kill_and_faults(tmp_path: Path) -> None:
    rc, rep, err = _run("stress", "--path", str(tmp_path), "--duration", "40", "--kill-every", "3", "--faults",
                        "0.02", timeout=400)
    assert rc == 0, (rep, err)
    assert rep["crashes"] >= 5 and rep["faults_detected"] > 0


@pytest.mark.stress
@pytest.mark.skipif(not MOONCAKE.exists(), reason="Mooncake trace not available")
def test_replay_full_mooncake(tmp_path: Path) -> None:
    rc, rep, err = _run("replay", str(MOONCAKE), timeout=600)
    assert rc == 0, err
    assert rep["requests"] == 12031 and rep["wrong"] == 0


def test_client_verification_finds_wrong_bytes_by_gather_and_by_layer_view() -> None:
    """The clients check most batches with one gather and every LAYER_VIEW_EVERY-th through layer_view: both find a
    block whose bytes are another block's."""
    from types import SimpleNamespace

    from tiered_kv.stress.clients import LAYER_VIEW_EVERY, RecentPrefixes, StoreClient

    opts = StressOptions(path="unused", device_blocks=8, host_blocks=8, disk_blocks=16)
    content = BlockContent(opts.model())
    hashes = [bytes([i]) * 32 for i in range(4)]
    cfg = KvBlockManagerConfig(model=opts.model(), device=LayoutConfig(num_blocks=8), device_type="cpu")
    with KvBlockManager(cfg) as bm:
        top = bm.top
        new = top.allocate_blocks(4)
        for blk, h in zip(new, hashes):
            content.fill(blk, h if h != hashes[2] else hashes[0])  # hashes[2] holds another block's bytes
        held = top.register_blocks(new, hashes)
        logged: list[str] = []
        stats = Stats()
        client = StoreClient(bm, content, SimpleNamespace(tag="t"), stats, RecentPrefixes(), logged.append)  # type: ignore[arg-type]
        for _ in range(2 * LAYER_VIEW_EVERY):
            client._verify(held, hashes, "check")
        assert stats["wrong"] == 2 * LAYER_VIEW_EVERY and stats["blocks_verified"] == 8 * LAYER_VIEW_EVERY
        assert all(f"for {hashes[2].hex()[:16]}" in line for line in logged)
        top.release_blocks(held)
