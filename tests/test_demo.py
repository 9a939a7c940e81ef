"""The long-context serving demo: a tiny configuration, run twice on one disk tier (seconds)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from click.testing import CliRunner

from tiered_kv.cli import main
from tiered_kv.cli.demo import DemoWorkloadSpec, build_workload, demo


def test_workload_is_deterministic_shared_and_growing() -> None:
    spec = DemoWorkloadSpec(users=3, turns=2, system_tokens=32, doc_tokens=64, message_tokens=8, reply_tokens=4)
    turns = build_workload(spec, vocab=100)
    assert [t.tokens for t in turns] == [t.tokens for t in build_workload(spec, vocab=100)]
    assert [(t.user, t.turn) for t in turns] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    first = {t.user: t.tokens for t in turns if t.turn == 0}
    assert first[0][:96] == first[2][:96] != first[1][:96]  # users 0 and 2 share system prompt and document
    again = {t.user: t.tokens for t in turns if t.turn == 1}
    for u in range(3):
        assert again[u][: len(first[u])] == first[u]  # a turn extends the conversation
        assert len(again[u]) == len(first[u]) + 4 + 8
    assert all(0 <= tok < 100 for t in turns for tok in t.tokens)


def test_demo_command_is_attached_to_the_cli() -> None:
    assert main.get_command(None, "demo") is demo  # type: ignore[arg-type]


def test_demo_two_runs_second_starts_warm_from_disk(tmp_path: Path) -> None:
    runner = CliRunner()
    t0 = time.perf_counter()
    args = ["--preset", "tiny", "--path", str(tmp_path / "demo")]
    first = runner.invoke(demo, [*args, "--fresh", "--json", str(tmp_path / "run1.json")])
    assert first.exit_code == 0, first.output
    second = runner.invoke(demo, [*args, "--json", str(tmp_path / "run2.json"), "--plot", str(tmp_path / "p.png")])
    assert second.exit_code == 0, second.output
    assert time.perf_counter() - t0 < 30

    run1 = json.loads((tmp_path / "run1.json").read_text())
    run2 = json.loads((tmp_path / "run2.json").read_text())
    assert "disk tier cold" in first.output and "disk tier warm" in second.output
    assert run1["totals"]["warm_disk_blocks_at_start"] == 0
    assert run2["totals"]["warm_disk_blocks_at_start"] > 0
    for run in (run1, run2):
        totals = run["totals"]
        assert totals["turns"] == 4 and len(run["turns"]) == 4
        assert totals["logits_equal"] is True
        assert totals["matched_tokens"] + totals["computed_tokens"] == totals["prompt_tokens"]
        assert sum(totals["matched_by_tier"].values()) == totals["matched_tokens"]
    # Tiny tiers: within the first run blocks already travel down and come back.
    assert run1["offload"]["demotions"] > 0 and run1["offload"]["promotions"] > 0
    # After the restart every first turn's prefix comes back from disk.
    first_turns = [t for t in run2["turns"] if t["user_turn"] == 1]
    assert all(t["disk_tokens"] > 0 and t["computed_tokens"] <= 16 for t in first_turns)
    assert run2["totals"]["computed_tokens"] < run1["totals"]["computed_tokens"]
    assert (tmp_path / "demo" / "ttft.png").stat().st_size > 0 and (tmp_path / "p.png").stat().st_size > 0


def test_fresh_wipes_the_disk_tier(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["--preset", "tiny", "--turns", "1", "--users", "1", "--no-recompute", "--path", str(tmp_path)]
    assert runner.invoke(demo, args).exit_code == 0
    result = runner.invoke(demo, [*args, "--fresh", "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["totals"]["warm_disk_blocks_at_start"] == 0
    assert summary["totals"]["recompute_s"] is None and summary["turns"][0]["recompute_s"] is None


def test_another_models_disk_tier_asks_for_fresh(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["--preset", "tiny", "--turns", "1", "--users", "1", "--no-recompute", "--path", str(tmp_path)]
    assert runner.invoke(demo, args).exit_code == 0
    result = runner.invoke(demo, [*args, "--seed", "7"])  # other weights: another namespace
    assert result.exit_code != 0
    assert "--fresh" in result.output
