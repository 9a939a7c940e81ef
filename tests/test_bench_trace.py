"""The trace benchmark's peer baselines replay what they claim to: vLLM's CPUOffloadingManager, driven as its
scheduler drives it, must cache as its own ARC policy does when driven directly (a driver that never stored, or
never looked up, would report a cost with nothing behind it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm.v1.kv_offload.cpu.manager", reason="vLLM 0.33 is not installed (tools/install_vllm.sh)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_trace

from tiered_kv.stress.tracegen import generate_trace

pytestmark = pytest.mark.vllm


def _requests(trace: str, tmp_path: Path) -> tuple[list[list[int]], int]:
    """(requests, capacity): a generated trace (always here), or the first 1,500 requests of a Mooncake trace."""
    if trace == "generated":
        path = tmp_path / "generated.jsonl"
        generate_trace(path, 3000, seed=1)  # 66,694 blocks, 10,134 distinct
        return bench_trace.load(path), 2048
    path = bench_trace.TRACES / f"{trace}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    return bench_trace.load(path)[:1500], 16384  # 30,000-36,000 blocks: both evict


@pytest.mark.parametrize("trace", ["generated", "mooncake_conversation", "mooncake_synthetic"])
def test_the_vllm_manager_replay_caches_as_its_policy_does(trace: str, tmp_path: Path) -> None:
    requests, capacity = _requests(trace, tmp_path)
    manager = bench_trace.replay_vllm_manager(requests, capacity)
    policy = bench_trace.replay_vllm_arc(requests, capacity)
    lru = bench_trace.replay_dict_lru(requests, capacity)
    assert manager is not None and policy is not None
    assert manager[1] > 0.15  # it hits: stores went in and lookups found them (0.21-0.80 here)
    # The manager protects the request's own keys from eviction, the bare policy driver does not; otherwise the same.
    assert abs(manager[1] - policy[1]) < 0.005, (manager[1], policy[1])
    assert abs(manager[1] - lru[1]) < 0.05, (manager[1], lru[1])
