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
    cache_kwarg,
    cache_to_block_data,
    kv_geometry,
    load_cache,
    model_config_for,
    output_cache,
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
        cache = output_cache(model(ids, use_cache=True))
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
            step = model(nxt, use_cache=True, **{cache_kwarg(model): output_cache(out)}).logits[0, -1]
    torch.testing.assert_close(step, full_logits(model, torch.cat([a, nxt], dim=1))[-1], atol=1e-5, rtol=0)


def test_store_keeps_the_prefix_that_fits() -> None:
    model = tiny_model("llama")
    ids = prompt(8 * PAGE)
    with memory_manager(model, device_blocks=3) as bm:
        held = bm.top.allocate_blocks(1)  # leave room for 2 blocks only
        with torch.inference_mode():
            kv = output_cache(model(ids, use_cache=True))
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


# ------------------------------------------------------------------------------------- collisions (issue 12)
def test_a_colliding_hash_with_other_tokens_is_a_miss_not_their_kv() -> None:
    """A block registered under this prompt's hashes but for other tokens (a crafted collision) is never restored."""
    model = tiny_model("llama")
    ids = prompt(6 * PAGE + 3, seed=1)
    other = prompt(6 * PAGE + 3, seed=2)
    with memory_manager(model) as bm:
        hashes = bm.sequence_hashes(ids[0].tolist())[:4]
        # The attacker's blocks: garbage KV, stored under our hashes with their own token ids.
        blocks = bm.top.allocate_blocks(4)
        bm.top.scatter(blocks, torch.full((4, *bm.model.block_shape), 7.0))
        pages = [other[0, i * PAGE : (i + 1) * PAGE].tolist() for i in range(4)]
        bm.top.release_blocks(bm.top.register_blocks(blocks, hashes, tokens=pages))

        out, stats = TieredPrefixCache(bm, model).prefill(ids)
        assert stats.matched_tokens == 0  # without tokens= the garbage would have been restored
        # Nothing is stored: blocks 0..3 collide, and 4..5 would only be reachable through them.
        assert stats.stored_blocks == 0
        torch.testing.assert_close(out.logits[0], full_logits(model, ids), atol=1e-5, rtol=0)
        _, gen = TieredPrefixCache(bm, model).generate(ids, max_new_tokens=3, do_sample=False)
        assert gen.matched_tokens == 0


def test_store_records_each_blocks_tokens() -> None:
    model = tiny_model("llama")
    ids = prompt(3 * PAGE + 1)
    with memory_manager(model) as bm:
        TieredPrefixCache(bm, model).prefill(ids)
        hashes = bm.sequence_hashes(ids[0].tolist())
        held = bm.top.match_sequence_hashes(hashes)
        assert len(held) == 3
        stored = bm.top.tokens_of(held)
        bm.top.release_blocks(held)
    expected = [torch.tensor(ids[0, i * PAGE : (i + 1) * PAGE].tolist(), dtype=torch.int32) for i in range(3)]
    assert stored == [t.numpy().astype("<u4").tobytes() for t in expected]


# ------------------------------------------------------------------------------------------ restore, one copy
def test_restore_copies_once_into_tensors_the_cache_holds() -> None:
    """The strided restore equals the gather + permute path, and the cache layers hold its tensors (no concat)."""
    model = tiny_model("qwen2")
    a, b = prompt(6 * PAGE, seed=1), prompt(6 * PAGE, seed=2)
    with memory_manager(model, device_blocks=16) as bm:
        cache = TieredPrefixCache(bm, model)
        cache.prefill(a[:, : 3 * PAGE + 1])
        cache.prefill(b[:, : 2 * PAGE + 1])  # interleave slots so a's later blocks are not next to its first ones
        cache.prefill(a)
        blocks = bm.match_sequence_hashes(bm.sequence_hashes(a[0].tolist()))
        slots = [blk.block_id for blk in blocks]
        assert len(blocks) == 6 and slots != list(range(slots[0], slots[0] + 6))  # more than one run of slots
        restored, n = load_cache(bm, blocks, 2, config=model.config)
        data, _ = bm.top.gather(blocks)
        bm.top.release_blocks(blocks)
    reference = block_data_to_cache(data, 2, config=model.config)
    assert n == 6
    for got, want in zip(restored.layers, reference.layers):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    with torch.inference_mode():
        full = output_cache(model(a, use_cache=True))
    for got, want in zip(restored.layers, full.layers):  # blocks 3..5 were computed over a restored prefix
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=0)
    # One buffer for all layers, handed over as is: no layer owns a concatenated copy.
    base = restored.layers[0].keys.untyped_storage().data_ptr()
    assert all(layer.keys.untyped_storage().data_ptr() == base for layer in restored.layers)
    assert all(layer.values.untyped_storage().data_ptr() == base for layer in restored.layers)


def test_restore_converts_dtype_on_the_way() -> None:
    model = tiny_model("llama")
    ids = prompt(4 * PAGE + 1)
    with memory_manager(model) as bm:
        TieredPrefixCache(bm, model).prefill(ids)
        blocks = bm.match_sequence_hashes(bm.sequence_hashes(ids[0].tolist()))
        restored, n = load_cache(bm, blocks, 2, config=model.config, dtype=torch.bfloat16)
        data, _ = bm.top.gather(blocks)
        bm.top.release_blocks(blocks)
    reference = block_data_to_cache(data, 2, config=model.config, dtype=torch.bfloat16)
    assert n == 4 and restored.layers[0].keys.dtype == torch.bfloat16
    assert all(torch.equal(g.keys, w.keys) for g, w in zip(restored.layers, reference.layers))


# ------------------------------------------------------------------------------------ generate, transformers 5
def test_cache_keyword_follows_the_models_signature() -> None:
    class Old:  # transformers 4.x
        def forward(self, input_ids: Any = None, past_key_values: Any = None) -> None: ...

    class New:  # transformers 5.x
        def forward(self, input_ids: Any = None, cache: Any = None, **kwargs: Any) -> None: ...

    assert cache_kwarg(Old()) == "past_key_values" and cache_kwarg(New()) == "cache"


def test_prefill_and_generate_use_no_deprecated_argument(recwarn: pytest.WarningsRecorder) -> None:
    model = tiny_model("llama")
    ids = prompt(3 * PAGE + 2)
    with memory_manager(model) as bm:
        cache = TieredPrefixCache(bm, model)
        cache.prefill(ids)
        cache.generate(ids, max_new_tokens=2, do_sample=False)
    deprecated = [str(w.message) for w in recwarn if "deprecated" in str(w.message)]
    assert deprecated == []


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_model_generate_and_stores_the_reply(family: str) -> None:
    model = tiny_model(family)
    model.generation_config.pad_token_id = 0
    ids = prompt(5 * PAGE + 3)
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2 * PAGE, do_sample=False)
    with memory_manager(model) as bm:
        cache = TieredPrefixCache(bm, model)
        cold, s0 = cache.generate(ids, max_new_tokens=2 * PAGE, do_sample=False)
        assert torch.equal(cold, want) and s0.matched_tokens == 0
        assert s0.generated_tokens == 2 * PAGE and s0.ttft_s > 0 and s0.decode_s > 0
        # Prompt + reply minus its last token are in the cache: 5 * PAGE + 3 + 2 * PAGE - 1 tokens, 7 full blocks.
        assert s0.stored_blocks == 7
        # Next turn: the conversation so far plus a new message; the reply's blocks are found too.
        turn2 = torch.cat([want, prompt(PAGE, seed=9)], dim=1)
        with torch.inference_mode():
            want2 = model.generate(turn2, attention_mask=torch.ones_like(turn2), max_new_tokens=PAGE,
                                   do_sample=False)
        got2, s2 = cache.generate(turn2, max_new_tokens=PAGE, do_sample=False)
    assert s2.matched_tokens == 7 * PAGE and s2.computed_tokens == turn2.shape[1] - 7 * PAGE
    assert torch.equal(got2, want2)


def test_generate_rejects_bad_arguments() -> None:
    model = tiny_model("llama")
    with memory_manager(model) as bm:
        cache = TieredPrefixCache(bm, model)
        with pytest.raises(ValueError, match="max_new_tokens"):
            cache.generate(prompt(PAGE), max_new_tokens=0)
        with pytest.raises(ValueError, match="cache"):
            cache.generate(prompt(PAGE), max_new_tokens=1, **{cache_kwarg(model): None})
        with pytest.raises(ValueError, match="empty"):
            cache.generate([], max_new_tokens=1)
