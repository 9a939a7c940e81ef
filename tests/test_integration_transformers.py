"""transformers integration: restored prefixes give the logits of a full prefill, across tiers and restarts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, LayoutConfig, ModelConfig  # noqa: E402
from tiered_kv.integrations.transformers import (  # noqa: E402
    TieredPrefixCache,
    block_data_to_cache,
    cache_to_block_data,
    kv_geometry,
    model_config_for,
    store_cache,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAGE = 8
VOCAB = 128
#: Max |logit difference| accepted between restore and full prefill (bitwise equal on the CPU kernels seen so far).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
FAMILIES = ("llama", "qwen2", "mistral")


def tiny_model(family: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa", seed: int = 0) -> Any:
    """A tiny randomly initialised decoder with grouped-query attention (4 heads, 2 KV heads); no downloads."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        attn_implementation=attn,
    )
    if family == "llama":
        cfg: Any = transformers.LlamaConfig(**common)
        cls: Any = transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None)
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    return model.to(dtype).eval()


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=g)


def full_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits[0]


def memory_manager(model: Any, device_blocks: int = 64, host_blocks: int | None = None) -> KvBlockManager:
    geometry = model_config_for(model, page_size=PAGE)
    host = LayoutConfig(num_blocks=host_blocks) if host_blocks else None
    return KvBlockManager(
        KvBlockManagerConfig(model=geometry, device=LayoutConfig(num_blocks=device_blocks), host=host,
                             device_type="cpu")
    )


# ---------------------------------------------------------------------------------------------------- geometry
def test_model_config_for_gqa_geometry_and_dtype() -> None:
    model = tiny_model("llama", torch.bfloat16)
    geo = kv_geometry(model.config)
    assert (geo.num_layers, geo.num_kv_heads, geo.head_dim, geo.inner_dim) == (2, 2, 16, 32)
    cfg = model_config_for(model, page_size=32)  # dtype: the model's parameters'
    assert cfg == ModelConfig(num_layers=2, inner_dim=32, page_size=32, dtype="bfloat16")
    assert model_config_for(model.config).inner_dim == 32
    assert model_config_for(model.config, dtype=torch.float16).dtype == "float16"
    assert model_config_for(model.config, dtype="float32").dtype == "float32"
    with pytest.raises(ValueError, match="dtype"):
        model_config_for(model.config, dtype="float64")


def test_explicit_head_dim_is_used() -> None:
    cfg = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                   num_hidden_layers=3)
    geo = kv_geometry(cfg)
    assert (geo.num_layers, geo.inner_dim) == (3, 32)


def test_manager_geometry_mismatch_is_refused() -> None:
    model = tiny_model("llama")
    bad = ModelConfig(num_layers=2, inner_dim=64, page_size=PAGE, dtype="float32")
    config = KvBlockManagerConfig(model=bad, device=LayoutConfig(num_blocks=4), device_type="cpu")
    with KvBlockManager(config) as bm, pytest.raises(ValueError, match="model needs 2 x 32"):
        TieredPrefixCache(bm, model)


# ------------------------------------------------------------------------------------------------- data mapping
def test_cache_block_round_trip_is_exact() -> None:
    model = tiny_model("qwen2")
    ids = prompt(5 * PAGE + 3)
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    data = cache_to_block_data(cache, PAGE, 3, PAGE)  # blocks 1..3
    assert tuple(data.shape) == (3, 2, 2, PAGE, 32)
    # Token t of block b, layer l, K: the cache's keys[0, :, PAGE * (1 + b) + t, :] flattened over heads.
    k = cache.layers[1].keys[0, :, PAGE * 2 + 5, :]
    assert torch.equal(data[1, 1, 0, 5], k.reshape(-1))
    rebuilt = block_data_to_cache(data, 2, config=model.config)
    for layer, orig in zip(rebuilt.layers, cache.layers):
        assert torch.equal(layer.keys, orig.keys[:, :, PAGE : 4 * PAGE])
        assert torch.equal(layer.values, orig.values[:, :, PAGE : 4 * PAGE])


def test_sliding_window_cache_cannot_be_stored() -> None:
    class Layer:  # what a sliding-window layer holds: only the last few tokens
        keys = values = torch.zeros(1, 2, 4, 16)

    class Cache:
        def __init__(self) -> None:
            self.layers = [Layer()]

    with pytest.raises(ValueError, match="sliding"):
        cache_to_block_data(Cache(), 0, 1, PAGE)


# ------------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_restored_logits_equal_full_prefill(family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family, dtype)
    ids = prompt(13 * PAGE + 5)
    with memory_manager(model) as bm:
        cache = TieredPrefixCache(bm, model)
        _, first = cache.prefill(ids[:, : 9 * PAGE + 2])
        assert first.matched_tokens == 0 and first.stored_blocks == 9
        out, stats = cache.prefill(ids)
    assert stats.matched_tokens == 9 * PAGE
    assert stats.computed_tokens == ids.shape[1] - 9 * PAGE
    assert stats.matched_by_tier["device"] == 9 * PAGE
    expected = full_logits(model, ids)[stats.matched_tokens :]
    torch.testing.assert_close(out.logits[0], expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_restored_logits_equal_with_both_attention_implementations(attn: str) -> None:
    model = tiny_model("llama", attn=attn)
    ids = prompt(6 * PAGE + 1)
    with memory_manager(model) as bm:
        cache = TieredPrefixCache(bm, model)
        cache.prefill(ids[:, : 4 * PAGE])
        out, stats = cache.prefill(ids)
    assert stats.matched_tokens == 4 * PAGE
    torch.testing.assert_close(out.logits[0], full_logits(model, ids)[4 * PAGE :], atol=1e-5, rtol=0)


def test_whole_prompt_cached_still_computes_the_last_block() -> None:
    model = tiny_model("llama")
    ids = prompt(4 * PAGE)
    with memory_manager(model) as bm:
        cache = TieredPrefixCache(bm, model)
        cache.prefill(ids)
        out, stats = cache.prefill(ids, logits_to_keep=1)
    assert (stats.matched_tokens, stats.computed_tokens, stats.stored_blocks) == (3 * PAGE, PAGE, 1)
    torch.testing.assert_close(out.logits[0, -1], full_logits(model, ids)[-1], atol=1e-5, rtol=0)


def test_restore_through_the_host_tier_and_decode_on() -> None:
    model = tiny_model("mistral")
    a, b = prompt(10 * PAGE + 1, seed=1), prompt(10 * PAGE + 1, seed=2)
    with memory_manager(model, device_blocks=12, host_blocks=24) as bm:
        cache = TieredPrefixCache(bm, model)
        cache.prefill(a)
        cache.prefill(b)  # pushes a's blocks down to the host tier
        assert sum(h in bm.host() for h in bm.sequence_hashes(a[0].tolist())) > 0  # type: ignore[operator]
        out, stats = cache.prefill(a)
        assert stats.matched_tokens == 10 * PAGE
        assert stats.matched_by_tier["host"] > 0
        assert sum(stats.matched_by_tier.values()) == stats.matched_tokens
        # The returned cache covers the whole prompt: decoding one more token equals a full pass.
        nxt = out.logits[0, -1].argmax().view(1, 1)
        with torch.inference_mode():
            step = model(nxt, past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
    torch.testing.assert_close(step, full_logits(model, torch.cat([a, nxt], dim=1))[-1], atol=1e-5, rtol=0)


def test_store_keeps_the_prefix_that_fits() -> None:
    model = tiny_model("llama")
    ids = prompt(8 * PAGE)
    with memory_manager(model, device_blocks=3) as bm:
        held = bm.top.allocate_blocks(1)  # leave room for 2 blocks only
        with torch.inference_mode():
            kv = model(ids, use_cache=True).past_key_values
        hashes = bm.sequence_hashes(ids[0].tolist())
        assert store_cache(bm, kv, hashes) == 2
        assert [h in bm.top for h in hashes[:3]] == [True, True, False]
        bm.top.release_blocks(held)


# -------------------------------------------------------------------------------------------- restart, disk
_CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import test_integration_transformers as t
    t.child_store({path!r}, {family!r}, {dtype!r}, {out!r})
    """
)


def disk_manager(model: Any, path: Path) -> KvBlockManager:
    geometry = model_config_for(model, page_size=PAGE)
    return KvBlockManager(
        KvBlockManagerConfig(
            model=geometry,
            device=LayoutConfig(num_blocks=16),
            host=LayoutConfig(num_blocks=16),
            disk=DiskConfig(path=path, num_blocks=128),
            namespace="tiny-test-model",
            device_type="cpu",
        )
    )


def child_store(path: str, family: str, dtype: str, out: str) -> None:
    """In a child process: prefill a prompt, push its blocks down to disk with others, flush, save logits, exit."""
    model = tiny_model(family, getattr(torch, dtype))
    with disk_manager(model, Path(path)) as bm:
        cache = TieredPrefixCache(bm, model)
        ids = prompt(12 * PAGE + 3, seed=1)
        cache.prefill(ids)
        for seed in range(2, 6):
            cache.prefill(prompt(15 * PAGE, seed=seed))  # 60 blocks through 16 + 16: the first prompt's go to disk
        bm.flush()
        assert all(h in bm.disk() for h in bm.sequence_hashes(ids[0].tolist()))  # type: ignore[operator]
    torch.save(full_logits(model, prompt(15 * PAGE, seed=1)), out)


@pytest.mark.parametrize(("family", "dtype"), [("llama", "float32"), ("qwen2", "bfloat16")])
def test_restart_restores_the_prefix_from_disk(tmp_path: Path, family: str, dtype: str) -> None:
    tier = tmp_path / "tier"
    saved = tmp_path / "logits.pt"
    code = _CHILD.format(tests=str(Path(__file__).parent), path=str(tier), family=family, dtype=dtype, out=str(saved))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)

    model = tiny_model(family, getattr(torch, dtype))
    ids = prompt(15 * PAGE, seed=1)  # the stored 12 blocks, then new tokens
    with disk_manager(model, tier) as bm:
        assert len(bm.device()) == 0 and len(bm.host()) == 0  # type: ignore[arg-type]
        out, stats = TieredPrefixCache(bm, model).prefill(ids)
        assert stats.matched_tokens == 12 * PAGE
        assert stats.matched_by_tier == {"device": 0, "host": 0, "disk": 12 * PAGE}
        assert bm.metrics()["offload"]["promotions"] >= 12
    tol = TOLERANCE[getattr(torch, dtype)]
    torch.testing.assert_close(out.logits[0], full_logits(model, ids)[12 * PAGE :], atol=tol, rtol=0)
    # ... and to the logits the first process computed with its own full prefill.
    torch.testing.assert_close(out.logits[0], torch.load(saved)[12 * PAGE :], atol=tol, rtol=0)
