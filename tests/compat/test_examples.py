"""Each seed's example in examples/ runs and reports what the seed promises (in process, a second or so each)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

EXPECTED = {
    "seed_000_block_pool.py": ["data intact: True", "pinned one stays"],
    "seed_001_eviction.py": [
        "low-priority block True, LRU block True, others kept True",
        "2 evicted blocks all demoted to the host tier: True",
    ],
    "seed_002_prefix_cache.py": ["6 requests: 20 blocks reused, 16 computed"],
    "seed_003_kv_cache.py": ["room for 200 more tokens: False", "swapped 6 blocks out and back in"],
    "seed_004_block_manager.py": ["matched 6/6 blocks", "worker-1 knows worker-0 holds a 12-block prefix"],
}


def test_every_seed_has_an_example() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("seed_*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    out = capsys.readouterr().out
    for expected in EXPECTED[name]:
        assert expected in out
