"""Hugging Face transformers integration: a returning prefix costs a copy, not a prefill.

A decoder's ``DynamicCache`` holds, per layer, keys and values of shape ``[batch, kv_heads, seq, head_dim]``.
A tiered_kv block holds ``page_size`` tokens of every layer: ``[layers, 2, page_size, kv_heads * head_dim]``.
The mapping is layer -> layer, K/V -> outer 0/1, tokens -> page, ``kv_heads x head_dim`` -> inner, so one block
of ``n`` tokens is one contiguous range of the cache's tokens, all layers included.

Typical use::

    from tiered_kv import KvBlockManager, KvBlockManagerConfig, LayoutConfig, DiskConfig
    from tiered_kv.integrations.transformers import TieredPrefixCache, model_config_for

    geometry = model_config_for(model, page_size=64)        # dtype: the model's
    bm = KvBlockManager(KvBlockManagerConfig(model=geometry, device=LayoutConfig(num_blocks=512),
                                             disk=DiskConfig(path="/nvme/kv", num_blocks=65536),
                                             namespace="my-model@rev"))
    cache = TieredPrefixCache(bm, model)
    out, stats = cache.prefill(input_ids)   # matched blocks restored, only the suffix computed, new blocks stored
    next_token = out.logits[0, -1].argmax()  # decode on with output_cache(out)
    sequences, stats = cache.generate(input_ids, max_new_tokens=64)  # model.generate from the cached prefix;
                                                                     # prompt + reply blocks stored for next turn

The restored keys and values are the bytes the model produced for the same tokens, so the logits of the suffix
equal those of a full prefill up to the floating-point reassociation of attending over a cache instead of over
the whole prompt at once (bitwise on the usual CPU kernels; within dtype tolerance in general). This holds when
the manager's dtype is the model's; a different one converts (e.g. storing a float32 model's KV as float16).

Matches pass the request's token ids and stored blocks carry theirs, so a hash collision (accidental or
crafted) is a miss, never another sequence's KV. The cache is handed to the model under the keyword the installed
transformers takes (``cache`` in 5.x, ``past_key_values`` before; see :func:`cache_kwarg`).

Sliding-window layers (e.g. Mistral with ``sliding_window`` shorter than the prompt) drop old tokens and cannot
be stored; :func:`cache_to_block_data` raises ``ValueError`` for them.

Requires ``transformers`` (``pip install 'tiered_kv[serving]'``).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from transformers.cache_utils import DynamicCache
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "tiered_kv.integrations.transformers needs the transformers package: pip install 'tiered_kv[serving]'"
    ) from exc
try:
    from transformers.cache_utils import DynamicLayer as _DynamicLayer

    _PLAIN_LAYER: type | None = _DynamicLayer
except ImportError:  # transformers < 4.56: no layer objects, the cache holds lists of tensors
    _PLAIN_LAYER = None

from ..blocks import ImmutableBlock
from ..config import ModelConfig, dtype_name
from ..errors import InvalidBlockError, NotEnoughBlocksAvailable
from ..manager import KvBlockManager
from ..storage import TensorArena

log = logging.getLogger(__name__)

__all__ = [
    "KvGeometry",
    "PrefillStats",
    "TieredPrefixCache",
    "block_data_to_cache",
    "cache_kwarg",
    "cache_to_block_data",
    "kv_geometry",
    "load_cache",
    "model_config_for",
    "output_cache",
    "store_cache",
    "tiers_of",
]


# ------------------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class KvGeometry:
    """The KV shape of a decoder: ``num_layers`` layers of ``num_kv_heads`` heads of ``head_dim``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def inner_dim(self) -> int:
        """``num_kv_heads * head_dim``: the block's inner dimension."""
        return self.num_kv_heads * self.head_dim


def _text_config(hf_config: Any) -> Any:
    get = getattr(hf_config, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except TypeError:
            return get()
    return hf_config


def kv_geometry(hf_config: Any) -> KvGeometry:
    """Layers, KV heads and head size of a transformers decoder config (Llama, Qwen2, Mistral, ... with GQA).

    Raises:
        ValueError: the config lacks ``num_hidden_layers`` or ``num_attention_heads``.
    """
    cfg = _text_config(hf_config)
    try:
        layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
    except AttributeError as exc:
        raise ValueError(f"hf_config: not a decoder config with layers and attention heads ({exc})") from exc
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return KvGeometry(num_layers=layers, num_kv_heads=int(kv_heads), head_dim=int(head_dim))


def model_config_for(model: Any, page_size: int = 16, dtype: torch.dtype | str | None = None) -> ModelConfig:
    """The tiered_kv block geometry that holds the KV cache of a transformers model.

    Args:
        model: the model, or its ``config`` (``PretrainedConfig``).
        page_size: tokens per block.
        dtype: KV dtype to store. Default: the model's parameters' dtype when given a model, else the config's
            ``dtype`` (float32 when unset). Store the model's own dtype for restored logits equal to a full
            prefill's.

    Raises:
        ConfigError: (a ``ValueError``) the dtype has no tiered_kv equivalent (see :func:`tiered_kv.config.dtype_name`).
    """
    params = getattr(model, "parameters", None)
    hf_config = model.config if callable(params) and hasattr(model, "config") else model
    geo = kv_geometry(hf_config)
    if dtype is None:
        if callable(params):
            dtype = next(iter(params())).dtype
        else:
            cfg = _text_config(hf_config)
            dtype = cfg.dtype if hasattr(cfg, "dtype") else getattr(cfg, "torch_dtype", None)
            dtype = dtype or torch.float32
    return ModelConfig(
        num_layers=geo.num_layers, inner_dim=geo.inner_dim, page_size=page_size, dtype=dtype_name(dtype)
    )


# ------------------------------------------------------------------------------------------- cache <-> block data
def cache_to_block_data(
    cache: Any, start_token: int, num_blocks: int, page_size: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Copy ``num_blocks`` pages of a ``DynamicCache`` (batch 1) into ``[n, layers, 2, page_size, inner]``.

    Args:
        cache: a ``DynamicCache`` (``cache.layers[i].keys`` / ``.values``: ``[1, kv_heads, seq, head_dim]``).
        start_token: first token of the first block (a multiple of ``page_size`` for aligned blocks).
        num_blocks: how many consecutive pages to copy.
        page_size: tokens per block.
        dtype: result dtype (default: the cache's).

    Raises:
        ValueError: batch size is not 1, or a layer does not hold the requested tokens (sliding window).
    """
    end = start_token + num_blocks * page_size
    layers = list(cache.layers)
    if not layers:
        raise ValueError("cache: no layers")
    for i, layer in enumerate(layers):
        k = layer.keys
        if k is None or k.dim() != 4 or k.shape[0] != 1:
            shape = None if k is None else tuple(k.shape)
            raise ValueError(f"cache layer {i}: expected keys of shape [1, heads, seq, head_dim], got {shape}")
        if k.shape[2] < end:
            raise ValueError(
                f"cache layer {i} holds {k.shape[2]} tokens, {end} needed (a sliding-window layer cannot be stored)"
            )
    first = layers[0].keys
    _, H, _, D = first.shape
    out = torch.empty((num_blocks, len(layers), 2, page_size, H * D), dtype=dtype or first.dtype, device=first.device)
    for i, layer in enumerate(layers):
        for o, t in enumerate((layer.keys, layer.values)):
            # One strided copy per layer and K/V: [H, n * P, D] tokens -> [n, P, H, D] pages, no intermediate stack.
            src = t[0, :, start_token:end].reshape(H, num_blocks, page_size, D).permute(1, 2, 0, 3)
            out[:, i, o].view(num_blocks, page_size, H, D).copy_(src)
    return out


def _layers_from_kv(kv: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` of shape ``[1, heads, seq, head_dim]``: views of ``kv`` (``[L, 2, H, S, D]``)."""
    return [(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(kv.shape[0])]


def _dynamic_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], config: Any = None) -> Any:
    """A ``DynamicCache`` that holds ``layers``' tensors themselves, not a concatenated copy of them.

    ``DynamicCache(layers)`` concatenates each tensor onto an empty one (a full copy of the prefix). When the
    cache built from ``config`` has plain dynamic layers (transformers >= 4.56), the tensors are handed to them
    as they are; other layer kinds (sliding windows, older transformers) take the constructor's path.
    """
    if config is not None:
        cache = DynamicCache(config=config)
        slots = getattr(cache, "layers", None)
        if (
            isinstance(slots, list)
            and len(slots) == len(layers)
            and all(type(layer) is _PLAIN_LAYER and hasattr(layer, "lazy_initialization") for layer in slots)
        ):
            for layer, (k, v) in zip(slots, layers):
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
            return cache
        return DynamicCache(layers, config=config)
    return DynamicCache(layers)


def block_data_to_cache(
    data: torch.Tensor,
    num_kv_heads: int,
    *,
    config: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """Build a ``DynamicCache`` holding ``n * page_size`` tokens from block data ``[n, layers, 2, page, inner]``.

    Args:
        data: blocks in token order.
        num_kv_heads: KV heads (``inner = num_kv_heads * head_dim``).
        config: the model config, so the cache gets the model's layer types (as the model would build it).
        device: where the cache lives (default: ``data``'s device).
        dtype: the cache's dtype (default: ``data``'s).
    """
    n, L, O, P, inner = data.shape  # noqa: E741
    if O != 2:
        raise ValueError(f"data: expected outer dimension 2 (K, V), got {O}")
    if inner % num_kv_heads:
        raise ValueError(f"data: inner dimension {inner} is not a multiple of num_kv_heads={num_kv_heads}")
    head_dim = inner // num_kv_heads
    kv = torch.empty((L, O, num_kv_heads, n * P, head_dim), dtype=dtype or data.dtype, device=device or data.device)
    # One strided copy (with any device or dtype conversion) straight into the cache's layout.
    kv.view(L, O, num_kv_heads, n, P, head_dim).copy_(
        data.view(n, L, O, P, num_kv_heads, head_dim).permute(1, 2, 4, 0, 3, 5)
    )
    return _dynamic_cache(_layers_from_kv(kv), config)


# ------------------------------------------------------------------------------------------------ manager helpers
def tiers_of(bm: KvBlockManager, hashes: Sequence[bytes]) -> list[str]:
    """For the leading hashes a match would find, the tier each is in now (highest first).

    Stops at the first hash no tier's pool holds (a block queued toward the disk tier and in no pool yet stops it
    too). Call it just before ``match_sequence_hashes`` to learn where a match's blocks come from; concurrent
    demotions may move a few in between. :attr:`PrefillStats.matched_by_tier` counts instead what the match
    itself found in each tier.
    """
    pools = bm.pools()
    out: list[str] = []
    for h in hashes:
        for pool in pools:
            if h in pool:
                out.append(pool.tier)
                break
        else:
            break
    return out


def _slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(first slot, first block index, length)`` for each run of consecutive slots."""
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(slots):
        if runs and s == runs[-1][0] + runs[-1][2]:
            s0, i0, n = runs[-1]
            runs[-1] = (s0, i0, n + 1)
        else:
            runs.append((s, i, 1))
    return runs


def load_cache(
    bm: KvBlockManager,
    blocks: Sequence[ImmutableBlock],
    num_kv_heads: int,
    *,
    config: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Any, int]:
    """Rebuild a ``DynamicCache`` from matched top-tier blocks (in token order).

    When the top tier is a memory arena, each run of consecutive slots is copied with one strided copy per layer
    straight from the arena into the cache's final ``[1, heads, seq, head_dim]`` tensors, which the cache layers
    then hold as they are: the bytes are copied once. A disk top tier reads (and verifies) the blocks with one
    batched gather first.

    Returns ``(cache, n)``: the cache holds the first ``n`` blocks; ``n < len(blocks)`` when a block failed its
    checksum (the pool drops it; everything from there on must be recomputed). ``cache`` is None when ``n == 0``.
    The blocks are not released.
    """
    if not blocks:
        return None, 0
    top = bm.top
    model = bm.model
    storage = top.storage
    if not isinstance(storage, TensorArena):
        data, bad = top.gather(blocks)
        n = min(bad) if bad else len(blocks)
        if n == 0:
            return None, 0
        return block_data_to_cache(data[:n], num_kv_heads, config=config, device=device, dtype=dtype), n
    for i, b in enumerate(blocks):
        if b.released or b.pool is not top:
            raise ValueError(f"blocks[{i}]: {b!r} is released or not a block of the top tier")
    n, P, inner = len(blocks), model.page_size, model.inner_dim
    if inner % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} does not divide the blocks' inner dimension {inner}")
    D = inner // num_kv_heads
    kv = torch.empty(
        (model.num_layers, 2, num_kv_heads, n * P, D),
        dtype=dtype or model.torch_dtype,
        device=device or storage.device,
    )
    for s0, i0, r in _slot_runs([b.block_id for b in blocks]):
        for layer in range(model.num_layers):
            # The blocks are held, so their slots cannot be reused while we read them.
            src = storage.layer_tensor(layer)[s0 : s0 + r].view(r, 2, P, num_kv_heads, D).permute(1, 3, 0, 2, 4)
            kv[layer, :, :, i0 * P : (i0 + r) * P].view(2, num_kv_heads, r, P, D).copy_(src)
    return _dynamic_cache(_layers_from_kv(kv), config), n


def store_cache(
    bm: KvBlockManager,
    cache: Any,
    hashes: Sequence[bytes],
    first_block: int = 0,
    tokens: Sequence[int] | None = None,
) -> int:
    """Store pages ``first_block .. first_block + len(hashes)`` of ``cache`` in the top tier under ``hashes``.

    One allocation, one batched scatter, one registration. When the top tier has room for fewer blocks (the rest
    is held by other callers), the leading ones that fit are stored: hashes are chained, so a prefix is still
    valid. Blocks already cached are deduplicated by the pool. Returns how many blocks were stored.

    Args:
        tokens: the token ids of the whole sequence the cache holds (from token 0). Each block is stored with
            its page of them, so that a match given the request's tokens never returns another sequence's KV
            under a colliding hash. A hash already registered with other token ids (a collision) stores nothing.
    """
    if not hashes:
        return 0
    top = bm.top
    model = bm.model
    page = model.page_size
    if tokens is not None and len(tokens) < (first_block + len(hashes)) * page:
        raise ValueError(f"tokens: {len(tokens)} ids do not cover blocks {first_block}..{first_block + len(hashes)}")
    n = min(len(hashes), top.available_blocks())
    blocks = []
    while n > 0:
        try:
            blocks = top.allocate_blocks(n)
            break
        except NotEnoughBlocksAvailable as exc:  # raced with another caller
            n = min(n - 1, exc.available)
    if not blocks:
        return 0
    per_block = None
    if tokens is not None:
        per_block = [list(tokens[(first_block + i) * page : (first_block + i + 1) * page]) for i in range(n)]
    try:
        data = cache_to_block_data(cache, first_block * page, n, page, model.torch_dtype)
        top.scatter(blocks, data)
        registered = top.register_blocks(blocks, list(hashes[:n]), tokens=per_block)
    except InvalidBlockError as exc:
        top.release_blocks(blocks)
        if "collision" not in str(exc):
            raise
        log.warning("not storing %d blocks: %s", n, exc)
        return 0
    except BaseException:
        top.release_blocks(blocks)
        raise
    top.release_blocks(registered)
    return n


def cache_kwarg(model: Any) -> str:
    """The keyword a model's ``forward`` and ``generate`` take the KV cache under.

    transformers 5.x names it ``cache`` (``past_key_values`` is deprecated, to be removed in 5.40); earlier
    versions only know ``past_key_values``.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache of a model's (or ``generate``'s) output, under the name this transformers version uses."""
    if "cache" in output:
        return output["cache"]
    return output.get("past_key_values")


# ---------------------------------------------------------------------------------------------------- prefill
@dataclass
class PrefillStats:
    """What one :meth:`TieredPrefixCache.prefill` (or ``generate``) did and how long each step took (seconds).

    ``ttft_s`` is the time to the first token's logits: match (including promotion from lower tiers), restore
    and the suffix's forward pass. Storing the new blocks happens after the logits exist (``store_s``).

    Attributes:
        prompt_tokens: tokens in the prompt.
        matched_tokens: leading tokens restored from cached blocks (a multiple of the page size).
        matched_by_tier: of those, how many the match found in each tier ("device", "host", "disk"; "remote"
            when that tier is configured), from the manager's per-tier hit counters and promotion counters
            (blocks queued toward the disk tier count as "host": their bytes are in memory). Exact when no other
            thread matches on the same manager at the same time.
        computed_tokens: tokens the model ran (``prompt_tokens - matched_tokens``; at least 1).
        stored_blocks: full blocks written to the top tier after the forward pass (the pool deduplicates any that
            were already cached).
        generated_tokens: new tokens (``generate`` only).
        decode_s: time from the first new token to the last (``generate`` only).
    """

    prompt_tokens: int
    matched_tokens: int = 0
    matched_by_tier: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0, "disk": 0})
    computed_tokens: int = 0
    stored_blocks: int = 0
    match_s: float = 0.0
    restore_s: float = 0.0
    forward_s: float = 0.0
    store_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0

    @property
    def ttft_s(self) -> float:
        """Match + restore + forward: the time until the first token's logits are available."""
        return self.match_s + self.restore_s + self.forward_s

    @property
    def hit_rate(self) -> float:
        """Matched / prompt tokens."""
        return self.matched_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def _token_list(input_ids: Any) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(f"input_ids: batch size must be 1, got shape {tuple(input_ids.shape)}")
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids: expected [n] or [1, n], got shape {tuple(input_ids.shape)}")
        return [int(t) for t in input_ids.tolist()]
    return [int(t) for t in input_ids]


def _tier_counters(bm: KvBlockManager) -> dict[str, int]:
    """Per tier, hits so far; per source tier, blocks promoted into the top tier so far (public metrics)."""
    m = bm.metrics()
    top = bm.top.tier
    out = {f"hits:{p.tier}": int(m[p.tier]["hits"]) for p in bm.pools()}
    for pair, count in m["offload"].get("per_pair", {}).items():
        src, _, dst = pair.partition("->")
        if dst == top:
            out[f"promoted:{src}"] = int(count)
    return out


def _matched_by_tier(bm: KvBlockManager, before: dict[str, int], m: int) -> dict[str, int]:
    """Blocks of an ``m``-block match per tier, from counter deltas (see :attr:`PrefillStats.matched_by_tier`)."""
    after = _tier_counters(bm)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    top = bm.top.tier
    out = {"device": 0, "host": 0, "disk": 0}
    promoted = 0
    for key, count in delta.items():
        kind, _, tier = key.partition(":")
        if kind == "promoted" and count > 0:
            tier = "host" if tier.endswith("-queue") else tier  # queued toward disk: bytes still in memory
            out[tier] = out.get(tier, 0) + count
            promoted += count
    out[top] = out.get(top, 0) + max(0, min(delta.get(f"hits:{top}", 0), m - promoted))
    # Anything not accounted for (a promotion another caller made for us) was in the top tier when we took it.
    out[top] += max(0, m - sum(out.values()))
    return out


class _FirstToken:
    """A ``generate`` streamer that notes when the first new token exists (and passes everything on)."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.puts = 0
        self.first_at: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2 and self.first_at is None:  # the first put is the prompt itself
            self.first_at = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


class TieredPrefixCache:
    """Prefill with a tiered prefix cache: match, restore, compute only the suffix, store the new full blocks.

    Args:
        bm: the manager; its ``ModelConfig`` must match the model's KV shape (see :func:`model_config_for`).
            Its namespace should name the model and revision: the hashes only cover tokens.
        model: a transformers causal LM (batch 1 prompts).
        store: store the prompt's new full blocks after the forward pass.

    Raises:
        ValueError: the manager's block geometry does not fit the model.
    """

    def __init__(self, bm: KvBlockManager, model: Any, *, store: bool = True) -> None:
        geo = kv_geometry(model.config)
        if (bm.model.num_layers, bm.model.inner_dim, bm.model.outer_dim) != (geo.num_layers, geo.inner_dim, 2):
            raise ValueError(
                f"the manager's blocks hold {bm.model.num_layers} layers x {bm.model.inner_dim} "
                f"(outer {bm.model.outer_dim}), the model needs {geo.num_layers} x {geo.inner_dim} (outer 2)"
            )
        self.bm = bm
        self.model = model
        self.geometry = geo
        self.store = store
        self.cache_kwarg = cache_kwarg(model)

    @property
    def page_size(self) -> int:
        """Tokens per block."""
        return self.bm.model.page_size

    def _model_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.model.parameters())
        return p.device, p.dtype

    def _restore(self, tokens: list[int], salt: str | bytes | None) -> tuple[Any, list[bytes], int, PrefillStats]:
        """Match and restore the longest cached prefix of ``tokens`` (at least one token left to compute)."""
        n = len(tokens)
        if n == 0:
            raise ValueError("input_ids: empty prompt")
        bm, page = self.bm, self.page_size
        stats = PrefillStats(prompt_tokens=n)
        device, dtype = self._model_device_dtype()
        hashes = bm.sequence_hashes(tokens, salt=salt)
        usable = hashes[: (n - 1) // page]  # keep >= 1 token to compute
        before = _tier_counters(bm) if usable else {}  # read outside the timed span: it is bookkeeping
        t0 = time.perf_counter()
        blocks = bm.match_sequence_hashes(usable, tokens=tokens[: len(usable) * page]) if usable else []
        t1 = time.perf_counter()
        try:
            cache, m = load_cache(
                bm, blocks, self.geometry.num_kv_heads, config=self.model.config, device=device, dtype=dtype
            )
        finally:
            bm.top.release_blocks(blocks)  # the cache holds a copy
        stats.match_s, stats.restore_s = t1 - t0, time.perf_counter() - t1
        if m:
            stats.matched_by_tier = {t: k * page for t, k in _matched_by_tier(bm, before, m).items()}
        stats.matched_tokens = m * page
        if cache is None:
            cache = DynamicCache(config=self.model.config)
        return cache, hashes, m, stats

    def _store(self, cache: Any, tokens: list[int], hashes: list[bytes], m: int, stats: PrefillStats) -> None:
        covered = min(len(hashes), cache.get_seq_length() // self.page_size)
        if self.store and covered > m:
            t = time.perf_counter()
            stats.stored_blocks = store_cache(self.bm, cache, hashes[m:covered], first_block=m, tokens=tokens)
            stats.store_s = time.perf_counter() - t

    def prefill(
        self, input_ids: Any, *, salt: str | bytes | None = None, **forward_kwargs: Any
    ) -> tuple[Any, PrefillStats]:
        """Run the prompt, reusing every cached full block of its prefix.

        At least the last token is always computed (its logits are the point). The returned output is the
        model's (``logits`` for the computed suffix, and the cache of the whole prompt, ready to decode, under
        the name the installed transformers uses: ``out.cache`` in 5.x, ``out.past_key_values`` before; see
        :func:`output_cache`).

        Args:
            input_ids: the prompt's token ids: a list, ``[n]`` or ``[1, n]`` tensor.
            salt: mixed into the hashes (e.g. a LoRA id or a tenant).
            **forward_kwargs: passed to the model (e.g. ``logits_to_keep=1``).
        """
        tokens = _token_list(input_ids)
        cache, hashes, m, stats = self._restore(tokens, salt)
        device, _ = self._model_device_dtype()
        n, start = len(tokens), m * self.page_size
        t2 = time.perf_counter()
        ids = torch.tensor([tokens[start:]], dtype=torch.long, device=device)
        positions = torch.arange(start, n, dtype=torch.long, device=device).unsqueeze(0)
        forward_kwargs[self.cache_kwarg] = cache
        with torch.inference_mode():
            out = self.model(input_ids=ids, position_ids=positions, use_cache=True, **forward_kwargs)
        stats.forward_s = time.perf_counter() - t2
        stats.computed_tokens = n - start
        self._store(output_cache(out), tokens, hashes, m, stats)
        return out, stats

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        *,
        salt: str | bytes | None = None,
        **generate_kwargs: Any,
    ) -> tuple[torch.Tensor, PrefillStats]:
        """``model.generate`` on the prompt, starting from its cached prefix; stores the new full blocks.

        The restored prefix is handed to ``model.generate`` as its cache, so decoding (greedy, sampling,
        stopping criteria, the model's generation config) is transformers' own and greedy replies are those of
        ``model.generate`` on the same prompt. Afterwards every full block of prompt + reply that the cache
        holds is stored (the reply's too), so the next turn of a conversation finds them.

        Args:
            input_ids: the prompt's token ids: a list, ``[n]`` or ``[1, n]`` tensor.
            max_new_tokens: the most tokens to generate.
            salt: mixed into the hashes (e.g. a LoRA id or a tenant).
            **generate_kwargs: passed to ``model.generate`` (e.g. ``do_sample=False``, ``streamer=...``).

        Returns:
            ``(sequences, stats)``: ``sequences`` is ``[1, n + new]`` like ``model.generate``'s; ``stats.ttft_s``
            runs to the first new token, ``stats.decode_s`` from there to the last.
        """
        tokens = _token_list(input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        for key in ("past_key_values", "cache", "return_dict_in_generate", "use_cache"):
            if key in generate_kwargs:
                raise ValueError(f"{key}: set by TieredPrefixCache.generate, not accepted")
        cache, _, m, stats = self._restore(tokens, salt)
        device, _ = self._model_device_dtype()
        n = len(tokens)
        streamer = _FirstToken(generate_kwargs.pop("streamer", None))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        generate_kwargs.setdefault("attention_mask", torch.ones_like(ids))
        generate_kwargs[self.cache_kwarg] = cache
        t2 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                streamer=streamer,
                return_dict_in_generate=True,
                use_cache=True,
                **generate_kwargs,
            )
        t3 = time.perf_counter()
        sequences = out.sequences
        first = streamer.first_at if streamer.first_at is not None else t3
        stats.forward_s, stats.decode_s = first - t2, t3 - first
        stats.computed_tokens = n - m * self.page_size
        stats.generated_tokens = int(sequences.shape[1]) - n
        full = _token_list(sequences)
        final = output_cache(out)
        if final is not None:
            self._store(final, full, self.bm.sequence_hashes(full, salt=salt), m, stats)
        return sequences, stats
