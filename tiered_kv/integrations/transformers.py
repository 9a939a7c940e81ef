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
    next_token = out.logits[0, -1].argmax()  # decode on with out.past_key_values

The restored keys and values are the bytes the model produced for the same tokens, so the logits of the suffix
equal those of a full prefill up to the floating-point reassociation of attending over a cache instead of over
the whole prompt at once (bitwise on the usual CPU kernels; within dtype tolerance in general). This holds when
the manager's dtype is the model's; a different one converts (e.g. storing a float32 model's KV as float16).

Sliding-window layers (e.g. Mistral with ``sliding_window`` shorter than the prompt) drop old tokens and cannot
be stored; :func:`cache_to_block_data` raises ``ValueError`` for them.

Requires ``transformers`` (``pip install 'tiered_kv[serving]'``).
"""

from __future__ import annotations

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

from ..blocks import ImmutableBlock
from ..config import DTYPES, ModelConfig
from ..errors import NotEnoughBlocksAvailable
from ..manager import KvBlockManager

__all__ = [
    "KvGeometry",
    "PrefillStats",
    "TieredPrefixCache",
    "block_data_to_cache",
    "cache_to_block_data",
    "kv_geometry",
    "load_cache",
    "model_config_for",
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


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        return name
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype: {dtype} has no tiered_kv equivalent")


def model_config_for(model: Any, page_size: int = 16, dtype: torch.dtype | str | None = None) -> ModelConfig:
    """The tiered_kv block geometry that holds the KV cache of a transformers model.

    Args:
        model: the model, or its ``config`` (``PretrainedConfig``).
        page_size: tokens per block.
        dtype: KV dtype to store. Default: the model's parameters' dtype when given a model, else the config's
            ``dtype`` (float32 when unset). Store the model's own dtype for restored logits equal to a full
            prefill's.
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
        num_layers=geo.num_layers, inner_dim=geo.inner_dim, page_size=page_size, dtype=_dtype_name(dtype)
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
    per_layer = []
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        if k is None or k.dim() != 4 or k.shape[0] != 1:
            shape = None if k is None else tuple(k.shape)
            raise ValueError(f"cache layer {i}: expected keys of shape [1, heads, seq, head_dim], got {shape}")
        if k.shape[2] < end:
            raise ValueError(
                f"cache layer {i} holds {k.shape[2]} tokens, {end} needed (a sliding-window layer cannot be stored)"
            )
        per_layer.append(torch.stack((k[0, :, start_token:end], v[0, :, start_token:end])))  # [2, H, T, D]
    if not per_layer:
        raise ValueError("cache: no layers")
    dev = per_layer[0].device
    kv = torch.stack([t.to(dev) for t in per_layer])  # [L, 2, H, T, D]
    L, O, H, _, D = kv.shape  # noqa: E741
    kv = kv.view(L, O, H, num_blocks, page_size, D).permute(3, 0, 1, 4, 2, 5)  # [n, L, 2, P, H, D]
    out = kv.reshape(num_blocks, L, O, page_size, H * D)  # the one copy
    return out if dtype is None else out.to(dtype)


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
    data = data.to(device=device or data.device, dtype=dtype or data.dtype)
    kv = data.view(n, L, O, P, num_kv_heads, head_dim).permute(1, 2, 4, 0, 3, 5)  # [L, 2, H, n, P, D]
    kv = kv.reshape(L, O, num_kv_heads, n * P, head_dim)  # one copy, all layers
    layers = [(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(L)]
    return DynamicCache(layers, config=config) if config is not None else DynamicCache(layers)


# ------------------------------------------------------------------------------------------------ manager helpers
def tiers_of(bm: KvBlockManager, hashes: Sequence[bytes]) -> list[str]:
    """For the leading hashes a match would find, the tier each is in now (highest first).

    Stops at the first hash no tier holds. A hash queued toward the disk tier but in no pool is reported as
    ``"host"`` (its bytes are in memory). Call it just before ``match_sequence_hashes`` to learn where a match's
    blocks come from; concurrent demotions may move a few in between.
    """
    pools = [(t, p) for t in ("device", "host", "disk") if (p := getattr(bm, t)()) is not None]
    inflight = getattr(getattr(bm, "scheduler", None), "inflight", {}) or {}
    queued = list(inflight.values())
    out: list[str] = []
    for h in hashes:
        for tier, pool in pools:
            if h in pool:
                out.append(tier)
                break
        else:
            if any(h in q for q in queued):
                out.append("host")
                continue
            break
    return out


def load_cache(
    bm: KvBlockManager,
    blocks: Sequence[ImmutableBlock],
    num_kv_heads: int,
    *,
    config: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Any, int]:
    """Rebuild a ``DynamicCache`` from matched top-tier blocks (in token order), with one batched gather.

    Returns ``(cache, n)``: the cache holds the first ``n`` blocks; ``n < len(blocks)`` when a block failed its
    checksum (the pool drops it; everything from there on must be recomputed). ``cache`` is None when ``n == 0``.
    The blocks are not released.
    """
    if not blocks:
        return None, 0
    data, bad = bm.top.gather(blocks)
    n = min(bad) if bad else len(blocks)
    if n == 0:
        return None, 0
    return block_data_to_cache(data[:n], num_kv_heads, config=config, device=device, dtype=dtype), n


def store_cache(bm: KvBlockManager, cache: Any, hashes: Sequence[bytes], first_block: int = 0) -> int:
    """Store pages ``first_block .. first_block + len(hashes)`` of ``cache`` in the top tier under ``hashes``.

    One allocation, one batched scatter, one registration. When the top tier has room for fewer blocks (the rest
    is held by other callers), the leading ones that fit are stored: hashes are chained, so a prefix is still
    valid. Blocks already cached are deduplicated by the pool. Returns how many blocks were stored.
    """
    if not hashes:
        return 0
    top = bm.top
    model = bm.model
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
    try:
        data = cache_to_block_data(cache, first_block * model.page_size, n, model.page_size, model.torch_dtype)
        top.scatter(blocks, data)
        registered = top.register_blocks(blocks, list(hashes[:n]))
    except BaseException:
        top.release_blocks(blocks)
        raise
    top.release_blocks(registered)
    return n


# ---------------------------------------------------------------------------------------------------- prefill
@dataclass
class PrefillStats:
    """What one :meth:`TieredPrefixCache.prefill` did and how long each step took (seconds).

    ``ttft_s`` is the time to the first token's logits: match (including promotion from lower tiers), restore
    and the suffix's forward pass. Storing the new blocks happens after the logits exist (``store_s``).

    Attributes:
        prompt_tokens: tokens in the prompt.
        matched_tokens: leading tokens restored from cached blocks (a multiple of the page size).
        matched_by_tier: of those, how many were in each tier just before the match ("device", "host", "disk").
        computed_tokens: tokens the model ran (``prompt_tokens - matched_tokens``; at least 1).
        stored_blocks: full blocks written to the top tier after the forward pass (the pool deduplicates any that
            were already cached).
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

    @property
    def page_size(self) -> int:
        """Tokens per block."""
        return self.bm.model.page_size

    def _model_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.model.parameters())
        return p.device, p.dtype

    def prefill(
        self, input_ids: Any, *, salt: str | bytes | None = None, **forward_kwargs: Any
    ) -> tuple[Any, PrefillStats]:
        """Run the prompt, reusing every cached full block of its prefix.

        At least the last token is always computed (its logits are the point). The returned output is the
        model's (``logits`` for the computed suffix, ``past_key_values`` for the whole prompt, ready to decode).

        Args:
            input_ids: the prompt's token ids: a list, ``[n]`` or ``[1, n]`` tensor.
            salt: mixed into the hashes (e.g. a LoRA id or a tenant).
            **forward_kwargs: passed to the model (e.g. ``logits_to_keep=1``).
        """
        tokens = _token_list(input_ids)
        n = len(tokens)
        if n == 0:
            raise ValueError("input_ids: empty prompt")
        bm, page = self.bm, self.page_size
        stats = PrefillStats(prompt_tokens=n)
        device, dtype = self._model_device_dtype()

        hashes = bm.sequence_hashes(tokens, salt=salt)
        usable = hashes[: (n - 1) // page]  # keep >= 1 token to compute
        t0 = time.perf_counter()
        where = tiers_of(bm, usable)
        blocks = bm.match_sequence_hashes(usable) if usable else []
        t1 = time.perf_counter()
        try:
            cache, m = load_cache(bm, blocks, self.geometry.num_kv_heads, config=self.model.config, device=device,
                                  dtype=dtype)
        finally:
            bm.top.release_blocks(blocks)  # the cache holds a copy
        # A block that reached a tier between the look and the match counts as the top tier's.
        where = where[:m] + [bm.top.tier] * (m - len(where))
        for tier in where:
            stats.matched_by_tier[tier] += page
        stats.matched_tokens = m * page
        if cache is None:
            cache = DynamicCache(config=self.model.config)
        t2 = time.perf_counter()

        start = m * page
        ids = torch.tensor([tokens[start:]], dtype=torch.long, device=device)
        positions = torch.arange(start, n, dtype=torch.long, device=device).unsqueeze(0)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True, **forward_kwargs
            )
        t3 = time.perf_counter()
        stats.computed_tokens = n - start
        stats.match_s, stats.restore_s, stats.forward_s = t1 - t0, t2 - t1, t3 - t2

        if self.store and len(hashes) > m:
            stats.stored_blocks = store_cache(bm, out.past_key_values, hashes[m:], first_block=m)
            stats.store_s = time.perf_counter() - t3
        return out, stats
