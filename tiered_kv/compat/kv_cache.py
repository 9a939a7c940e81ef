"""Seed 003 (KVCacheManager): per-request paged KV allocation with CPU swap, on the tiered engine.

::

    mgr = create_kv_cache_manager(num_layers=32, num_heads=8, head_dim=128, num_blocks=2048, block_size=16)
    table = mgr.allocate("req-1", num_tokens=100)      # KVCacheBlocks: 7 device block ids
    mgr.extend("req-1", 40)                            # grows to 9 blocks
    mgr.get_block_table("req-1", layer_idx=0)          # the ids the attention kernel indexes
    mgr.free("req-1")

:class:`KVCacheManager` *is* a :class:`~tiered_kv.manager.KvBlockManager` (a subclass adding the seed's names), so
everything the engine does (prefix matching, host/disk tiers, metrics) is there too; ``num_cpu_blocks`` is its host
tier. A block's layers share one slot, so the block table is the same for every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field, fields
from typing import Any

from ..blocks import ImmutableBlock, MutableBlock
from ..config import KvBlockManagerConfig, LayoutConfig, ModelConfig, _positive_int
from ..enums import DeviceType, DType, plain
from ..errors import ConfigError
from ..manager import KvBlockManager

__all__ = [
    "DType",
    "DeviceType",
    "KVCacheBlocks",
    "KVCacheConfig",
    "KVCacheManager",
    "KVCacheTransfer",
    "create_kv_cache_manager",
]


@dataclass(frozen=True)
class KVCacheConfig:
    """Seed 003's configuration: the model's KV geometry and the device (GPU) and host (CPU) block counts (the
    seed's fields in the seed's order, positional or by keyword).

    ``dtype`` and ``device`` take the :class:`DType` / :class:`DeviceType` members or their strings; ``device`` is
    CUDA by default as in the seed (a ConfigError when CUDA is unavailable; ``DeviceType.AUTO`` picks CUDA when
    there is one, else the CPU). ``manager_options`` are passed on to
    :class:`~tiered_kv.config.KvBlockManagerConfig` (``disk``, ``eviction``, ``worker_id``, ...).
    """

    num_layers: int
    num_heads: int
    head_dim: int
    block_size: int
    num_gpu_blocks: int
    num_cpu_blocks: int = 0
    dtype: str | DType = DType.FLOAT16
    device: str | DeviceType = DeviceType.CUDA
    _: KW_ONLY  # the seed's fields may be positional; the engine's additions are keyword-only
    manager_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "head_dim", "block_size", "num_gpu_blocks"):
            _positive_int(name, getattr(self, name))
        n = self.num_cpu_blocks
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError("num_cpu_blocks", n, "must be an int >= 0")
        object.__setattr__(self, "dtype", plain(self.dtype))
        object.__setattr__(self, "device", plain(self.device))
        if not isinstance(self.manager_options, dict):
            raise ConfigError("manager_options", self.manager_options, "must be a dict")
        allowed = {f.name for f in fields(KvBlockManagerConfig)} - {"model", "device", "host", "device_type"}
        for key in self.manager_options:
            if key not in allowed:
                raise ConfigError(key, self.manager_options[key], "is not an option of this manager")
        self.model_config()

    def model_config(self) -> ModelConfig:
        """The engine's block geometry: ``inner_dim = num_heads * head_dim``, ``page_size = block_size``."""
        return ModelConfig(
            num_layers=self.num_layers,
            inner_dim=self.num_heads * self.head_dim,
            page_size=self.block_size,
            dtype=str(self.dtype),
        )

    def kv_size_per_token(self) -> int:
        """Bytes of K and V for one token across all layers."""
        return self.model_config().kv_size_per_token

    def block_size_bytes(self) -> int:
        """Bytes of one block (all layers, K and V)."""
        return self.model_config().block_size_bytes

    def manager_config(self) -> KvBlockManagerConfig:
        """The :class:`~tiered_kv.config.KvBlockManagerConfig` the manager runs on."""
        return KvBlockManagerConfig(
            model=self.model_config(),
            device=LayoutConfig(num_blocks=self.num_gpu_blocks),
            host=LayoutConfig(num_blocks=self.num_cpu_blocks) if self.num_cpu_blocks else None,
            device_type=str(self.device),
            **self.manager_options,
        )


@dataclass
class KVCacheBlocks:
    """The blocks of one request: device (GPU) block ids and host (CPU) block ids."""

    gpu_blocks: list[int] = field(default_factory=list)
    cpu_blocks: list[int] = field(default_factory=list)

    def num_blocks(self) -> int:
        """Device plus host blocks."""
        return len(self.gpu_blocks) + len(self.cpu_blocks)

    def append_gpu(self, block_id: int) -> None:
        """Add a device block id."""
        self.gpu_blocks.append(block_id)

    def append_cpu(self, block_id: int) -> None:
        """Add a host block id."""
        self.cpu_blocks.append(block_id)


class KVCacheManager(KvBlockManager):
    """Seed 003's manager: a :class:`~tiered_kv.manager.KvBlockManager` with the seed's request-level names.

    Args:
        config: a :class:`KVCacheConfig` (or a ready :class:`~tiered_kv.config.KvBlockManagerConfig`).
    """

    def __init__(self, config: KVCacheConfig | KvBlockManagerConfig, **kwargs: Any) -> None:
        self.kv_config = config if isinstance(config, KVCacheConfig) else None
        super().__init__(config.manager_config() if isinstance(config, KVCacheConfig) else config, **kwargs)

    def allocate(self, request_id: Any, num_tokens: int) -> KVCacheBlocks:
        """Allocate device blocks for ``num_tokens`` tokens of a new request (all or nothing).

        Raises:
            ValueError: the request is already allocated. NotEnoughBlocksAvailable: not enough room.
        """
        return KVCacheBlocks(gpu_blocks=self.allocate_for_request(request_id, num_tokens))

    def free(self, request_id: Any) -> None:
        """Release every block of the request (unknown ids raise KeyError)."""
        self.free_request(request_id)

    def get_block_table(self, request_id: Any, layer_idx: int | None = None) -> list[int]:
        """The request's device block ids in token order (the same for every layer: layers share a slot).

        Raises:
            KeyError: an unknown request. IndexError: ``layer_idx`` out of range.
        """
        if layer_idx is not None and not (
            isinstance(layer_idx, int) and not isinstance(layer_idx, bool) and 0 <= layer_idx < self.model.num_layers
        ):
            raise IndexError(f"layer_idx must be in [0, {self.model.num_layers}), got {layer_idx!r}")
        return super().get_block_table(request_id)

    def usage(self) -> float:
        """Fraction of the device tier allocated or referenced."""
        return self.top.usage_rate()

    def get_num_free_blocks(self) -> int:
        """Free plus evictable device blocks."""
        return self.top.available_blocks()


class KVCacheTransfer:
    """Seed 003's CPU <-> GPU copies, on a manager's device and host tiers."""

    def __init__(self, manager: KvBlockManager) -> None:
        self.manager = manager

    def swap_out(
        self, gpu_blocks: ImmutableBlock | Sequence[ImmutableBlock], cpu_blocks: Any = None
    ) -> list[ImmutableBlock] | None:
        """Copy device blocks to the host.

        Without ``cpu_blocks``: registered device blocks are copied into host blocks registered under the same
        hashes, which are returned (``KvBlockManager.swap_out``). With ``cpu_blocks`` (mutable host blocks): a plain
        byte copy into them (``KvBlockManager.copy_blocks``).
        """
        return self._move(gpu_blocks, cpu_blocks, self.manager.swap_out)

    def swap_in(
        self, cpu_blocks: ImmutableBlock | Sequence[ImmutableBlock], gpu_blocks: Any = None
    ) -> list[ImmutableBlock] | None:
        """Copy host blocks to the device (see :meth:`swap_out`; ``KvBlockManager.swap_in``)."""
        return self._move(cpu_blocks, gpu_blocks, self.manager.swap_in)

    def copy_blocks(self, src_blocks: Sequence[Any], dst_blocks: Sequence[MutableBlock]) -> None:
        """Byte copy between blocks of any tiers (``KvBlockManager.copy_blocks``)."""
        self.manager.copy_blocks(src_blocks, dst_blocks)

    def _move(self, src: Any, dst: Any, swap: Any) -> list[ImmutableBlock] | None:
        src_list = [src] if not isinstance(src, Sequence) else list(src)
        if dst is None:
            result: list[ImmutableBlock] = swap(src_list)
            return result
        self.manager.copy_blocks(src_list, [dst] if not isinstance(dst, Sequence) else list(dst))
        return None


def create_kv_cache_manager(
    num_layers: int, num_heads: int, head_dim: int, num_blocks: int, block_size: int, **config: Any
) -> KVCacheManager:
    """A :class:`KVCacheManager` (a :class:`~tiered_kv.manager.KvBlockManager`) for a model's KV geometry.

    Args:
        num_layers, num_heads, head_dim: the model's KV shape (``num_heads`` counts KV heads).
        num_blocks: device blocks; block_size: tokens per block.
        **config: ``num_cpu_blocks`` (host tier), ``dtype`` (default "float16"), ``device`` (default "auto": CUDA
            when available, else the CPU), and any :class:`~tiered_kv.config.KvBlockManagerConfig` field
            (``disk``, ``eviction``, ``hash_algorithm``, ``namespace``, ``worker_id``, ``remote``, ...).

    Raises:
        ConfigError: a bad value, naming the field.
    """
    own = {k: config.pop(k) for k in ("num_cpu_blocks", "dtype", "device") if k in config}
    own.setdefault("device", DeviceType.AUTO)
    if "device_type" in config:
        own["device"] = config.pop("device_type")
    if "host" in config:
        raise ConfigError("host", config["host"], "use num_cpu_blocks=N for the host tier")
    kv = KVCacheConfig(
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=head_dim,
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        manager_options=config,
        **own,
    )
    return KVCacheManager(kv)
