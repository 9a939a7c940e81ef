"""Seed 002 (PrefixCacheManager) facade: content-addressed prefix caching on the tiered engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tiered_kv import (
    BlockNotComplete,
    ConfigError,
    InvalidBlockError,
    KvBlockManager,
    NotEnoughBlocksAvailable,
    compute_sequence_hashes,
)
from tiered_kv.compat import (
    BlockHash,
    BlockState,
    HashAlgorithm,
    PrefixCacheManager,
    compute_cache_keys,
    compute_prefix_match,
    get_hash_function,
    hash_block_tokens,
    init_none_hash,
)


@pytest.fixture
def cache() -> Iterator[PrefixCacheManager]:
    with PrefixCacheManager(block_size=4, max_blocks=4, num_layers=2, inner_dim=8, dtype="float32",
                            host_blocks=16, device_type="cpu") as c:
        yield c


def serve(cache: PrefixCacheManager, tokens: list[int], value: float = 1.0) -> tuple[int, list[int]]:
    """One request: reuse the cached prefix, fill the rest, free everything. Returns (hit blocks, block ids)."""
    hashes = cache.compute_block_hashes(tokens)
    hit = cache.get_cached_blocks(hashes)
    new = cache.allocate_blocks(hashes, len(hit))
    for b in new:
        b.layer_view(0, 0).fill_(value)
    ids = [b.block_id for b in hit + new]
    cache.free_blocks(ids)
    return len(hit), ids


def test_hashes_chain_like_the_engine_and_carry_their_tokens(cache: PrefixCacheManager) -> None:
    tokens = list(range(100, 110))
    hashes = cache.compute_block_hashes(tokens)
    assert len(hashes) == 2  # the trailing partial block gets none
    assert hashes == compute_sequence_hashes(tokens, 4)
    assert hashes[0].token_ids == (100, 101, 102, 103) and hashes[1].parent == hashes[0]
    fn = get_hash_function(HashAlgorithm.SHA256)
    h0 = hash_block_tokens(fn, None, tokens[:4])
    h1 = hash_block_tokens(fn, h0, tokens[4:8])
    assert [h0, h1] == hashes and hash(h1) == hash(bytes(h1)) and h1.hash_value == bytes(h1)
    assert compute_sequence_hashes(tokens, 4, parent=init_none_hash(fn)) == hashes
    assert hash_block_tokens(fn, None, tokens[:4], extra_keys=("img", 7)) != h0
    with_keys = cache.compute_block_hashes(tokens, extra_keys_per_block=[("img", 7), None, "ignored: partial"])
    assert with_keys[0] == hash_block_tokens(fn, None, tokens[:4], ("img", 7)) and with_keys[0].extra_keys == ("img", 7)
    with pytest.raises(ValueError, match="curr_block_token_ids"):
        hash_block_tokens(fn, None, [])


def test_xxh3_and_helper_functions() -> None:
    with PrefixCacheManager(4, 4, HashAlgorithm.XXH3_128, device_type="cpu") as c:
        hashes = c.compute_block_hashes(list(range(12)))
        assert len(hashes[0]) == 16 and c.hash_algorithm is HashAlgorithm.XXH3_128
        assert hashes == compute_sequence_hashes(list(range(12)), 4, algorithm=HashAlgorithm.XXH3_128)
    keys = compute_cache_keys(["a", "b"], [list(range(8)), list(range(4)) + [9] * 4], 4)
    assert compute_prefix_match(keys["a"], keys["b"]) == 1
    assert compute_prefix_match(set(keys["a"]), keys["b"]) == 1
    with pytest.raises(ValueError, match="algorithm"):
        get_hash_function("md5")


def test_a_returning_prefix_is_served_from_the_cache(cache: PrefixCacheManager) -> None:
    prompt = list(range(16))
    assert serve(cache, prompt)[0] == 0
    hit, ids = serve(cache, prompt[:8] + [7] * 8)  # shares the first two blocks
    assert hit == 2
    stats = cache.get_stats()
    assert stats["num_cached_blocks"] == 4 and stats["hits"] == 2 and stats["pending_blocks"] == 0
    assert all(cache.pool.block_state(i) is BlockState.CACHED for i in ids)


def test_cached_blocks_are_referenced_until_freed(cache: PrefixCacheManager) -> None:
    serve(cache, list(range(8)))
    hashes = cache.compute_block_hashes(list(range(8)))
    held = cache.get_cached_blocks(hashes)
    assert [b.ref_cnt for b in held] == [1, 1]
    with pytest.raises(NotEnoughBlocksAvailable):
        cache.allocate_blocks(cache.compute_block_hashes(list(range(50, 66))))  # 4 blocks, 2 are held
    cache.free_blocks([b.block_id for b in held])
    assert len(cache.allocate_blocks(cache.compute_block_hashes(list(range(50, 66))))) == 4


def test_token_ids_are_verified(cache: PrefixCacheManager) -> None:
    serve(cache, list(range(8)))
    real = cache.compute_block_hashes(list(range(8)))
    forged = [BlockHash(h, [t + 1 for t in h.token_ids]) for h in real]  # same hash, other tokens: a collision
    assert cache.get_cached_blocks(forged) == []
    assert len(cache.get_cached_blocks([bytes(h) for h in real])) == 2  # plain bytes: nothing to verify


def test_without_eviction_a_full_cache_refuses(cache: PrefixCacheManager) -> None:
    with PrefixCacheManager(block_size=4, max_blocks=2, enable_eviction=False, device_type="cpu") as c:
        serve(c, list(range(8)))
        with pytest.raises(NotEnoughBlocksAvailable):
            c.allocate_blocks(c.compute_block_hashes(list(range(20, 24))))
        assert c.get_stats()["evictions"] == 0
        c.reset()
        assert c.get_cached_blocks(c.compute_block_hashes(list(range(8)))) == []
        assert len(c.allocate_blocks(c.compute_block_hashes(list(range(20, 28))))) == 2
    with pytest.raises(ConfigError, match="enable_eviction"):
        PrefixCacheManager(4, 4, enable_eviction="no")  # type: ignore[arg-type]


def test_with_eviction_old_blocks_move_to_the_host_and_come_back(cache: PrefixCacheManager) -> None:
    serve(cache, list(range(16)), value=3.0)
    for start in (100, 200):
        serve(cache, list(range(start, start + 16)))
    back = cache.get_cached_blocks(cache.compute_block_hashes(list(range(16))))
    assert len(back) == 4
    assert all(float(b.layer_view(0, 0)[0, 0]) == 3.0 for b in back)
    assert cache.get_stats()["tiers"]["offload"]["promotions"] == 4
    cache.free_blocks([b.block_id for b in back])


def test_pin_unpin_reset_and_uncached_free(cache: PrefixCacheManager) -> None:
    _, ids = serve(cache, list(range(8)))
    cache.pin_block(ids[0])
    assert cache.pool.block_state(ids[0]) is BlockState.PINNED
    with pytest.raises(InvalidBlockError):
        cache.reset()  # a pinned block cannot be dropped
    cache.unpin_block(ids[0])
    hashes = cache.compute_block_hashes(list(range(30, 34)))
    new = cache.allocate_blocks(hashes)
    with pytest.raises(InvalidBlockError, match="not cached"):
        cache.pin_block(new[0].block_id)  # its data is not written yet
    cache.free_blocks([new[0].block_id], cache=False)
    assert cache.get_cached_blocks(hashes) == []
    unwritten = cache.allocate_blocks(hashes)
    cache.free_blocks([unwritten[0].block_id])  # an aborted request: nothing written, so nothing cached
    assert cache.get_cached_blocks(hashes) == [] and cache.get_stats()["pending_blocks"] == 0
    cache.reset()
    assert cache.get_stats()["num_cached_blocks"] == 0


def test_commit_makes_blocks_shareable_before_the_request_ends(cache: PrefixCacheManager) -> None:
    hashes = cache.compute_block_hashes(list(range(8)))
    mine = cache.allocate_blocks(hashes)
    with pytest.raises(BlockNotComplete):
        cache.commit_blocks([b.block_id for b in mine])  # nothing written yet
    for b in mine:
        b.layer_view(0, 0).fill_(2.0)
    committed = cache.commit_blocks([b.block_id for b in mine])
    other = cache.get_cached_blocks(hashes)
    assert [b.block_id for b in other] == [b.block_id for b in committed]
    assert [b.ref_cnt for b in other] == [2, 2]
    cache.free_blocks([b.block_id for b in mine + other])
    assert cache.pool.available_blocks() == 4


def test_on_an_existing_manager(two_tier: KvBlockManager) -> None:
    with PrefixCacheManager(4, 4, manager=two_tier) as c:
        serve(c, list(range(8)))
    assert not two_tier.closed and len(two_tier.device()) == 2  # type: ignore[arg-type]
