"""Configuration: frozen keyword-only dataclasses validated on construction.

Every bad value raises :class:`~tiered_kv.errors.ConfigError` naming the field and the value.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch

from .enums import plain
from .errors import ConfigError
from .hashing import HASH_LENGTHS

__all__ = [
    "ModelConfig",
    "LayoutConfig",
    "DiskConfig",
    "KvBlockManagerConfig",
    "RemoteConfig",
    "OffloadConfig",
    "DTYPES",
    "LAYOUTS",
    "HASH_ALGORITHMS",
    "dtype_name",
]

#: Supported KV dtypes by name.
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
LAYOUTS = ("fully_contiguous", "layer_separate")
HASH_ALGORITHMS = tuple(HASH_LENGTHS)  # the hash algorithms, in the one table of their digest lengths
BACKENDS = ("auto", "posix", "kvikio")
DURABILITIES = ("sync", "batch", "none")
DEVICE_TYPES = ("auto", "cuda", "cpu")


def dtype_name(dtype: torch.dtype | str) -> str:
    """The name :class:`ModelConfig` takes for a KV dtype: ``torch.bfloat16``, ``"torch.bfloat16"`` and
    ``"bfloat16"`` (or a :class:`~tiered_kv.enums.DType` member) all give ``"bfloat16"``.

    Raises:
        ConfigError: not one of the supported dtypes (:data:`DTYPES`).
    """
    name = plain(dtype) if isinstance(dtype, str) else str(dtype)
    name = name.removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError("dtype", dtype, f"has no tiered_kv equivalent (supported: {', '.join(DTYPES)})")
    return name


def _positive_int(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, value, "must be an int")
    if value <= 0:
        raise ConfigError(field, value, "must be > 0")


def _choice(field: str, value: object, choices: tuple[str, ...] | list[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(field, value, f"must be one of {', '.join(map(repr, choices))}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of one KV block.

    A block holds ``page_size`` tokens of K and V (``outer_dim`` = 2) for every layer; ``inner_dim`` is
    heads x head_dim of one of them.
    """

    num_layers: int
    inner_dim: int
    page_size: int = 16
    outer_dim: int = 2
    dtype: str = "float16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", plain(self.dtype))  # a DType member is stored as its plain string
        for name in ("num_layers", "inner_dim", "page_size", "outer_dim"):
            _positive_int(name, getattr(self, name))
        _choice("dtype", self.dtype, list(DTYPES))

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by :attr:`dtype`."""
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """``(num_layers, outer_dim, page_size, inner_dim)``."""
        return (self.num_layers, self.outer_dim, self.page_size, self.inner_dim)

    @property
    def block_size_bytes(self) -> int:
        """Bytes of one block: num_layers*outer_dim*page_size*inner_dim*itemsize."""
        return self.num_layers * self.outer_dim * self.page_size * self.inner_dim * self.itemsize

    @property
    def kv_size_per_token(self) -> int:
        """Bytes of K and V for one token across all layers."""
        return self.num_layers * self.outer_dim * self.inner_dim * self.itemsize

    def fingerprint(self) -> str:
        """A stable string that changes when any field changes (same value in every process)."""
        doc = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(doc.encode()).hexdigest()[:16]
        return (
            f"L{self.num_layers}-O{self.outer_dim}-P{self.page_size}-I{self.inner_dim}-{self.dtype}-{digest}"
        )


@dataclass(frozen=True, kw_only=True)
class LayoutConfig:
    """Size and memory layout of a device or host tier."""

    num_blocks: int
    layout: str = "fully_contiguous"

    def __post_init__(self) -> None:
        _positive_int("num_blocks", self.num_blocks)
        _choice("layout", self.layout, LAYOUTS)


@dataclass(frozen=True, kw_only=True)
class DiskConfig:
    """The NVMe tier: a directory holding preallocated block files and an LMDB registry.

    ``backend``: "auto" (kvikio when CUDA and kvikio are usable, else "posix"), "kvikio", "posix".
    ``durability``: "sync" (each write batch is synced before it completes), "batch" (synced at least every
    second and at flush/close), "none" (the OS decides; flush/close still sync).
    ``writeback_s``: every block registered in a memory tier reaches the disk tier within this many seconds of
    its registration when the disk can take it, parents before children (``flush()``/``close()`` finish what is
    pending). A block is written once it has stayed in memory 40% of that time: blocks evicted sooner reach the
    disk by demotion (one write either way), so the writeback does not compete with serving for them.
    ``None`` writes blocks down only when a memory tier evicts them (or on ``persist()``): less disk traffic,
    but what sits in memory at a crash or a plain ``close()`` is lost to the next process.
    """

    path: str | os.PathLike[str]
    num_blocks: int
    backend: str = "auto"
    durability: str = "batch"
    writeback_s: float | None = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise ConfigError("path", self.path, "must be a non-empty path")
        _positive_int("num_blocks", self.num_blocks)
        _choice("backend", self.backend, BACKENDS)
        _choice("durability", self.durability, DURABILITIES)
        w = self.writeback_s
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf")):
            raise ConfigError("writeback_s", w, "must be None or a positive number of seconds")


@dataclass(frozen=True, kw_only=True)
class RemoteConfig:
    """The remote tier: Redis (one server) or Redis Cluster, shared by serving nodes.

    ``url``: "redis://host:port" (or "rediss://" for TLS), or a list of Redis Cluster nodes.
    ``mode``: "write_back" (blocks evicted from the lowest local tier are written to the remote tier) or
    "write_through" (every registered block is also written to the remote tier in the background).
    ``timeout``: seconds after which a remote operation counts as failed (a miss, or a dropped write).
    """

    url: str | tuple[str, ...] | list[str]
    mode: str = "write_back"
    timeout: float = 0.5
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    ssl_ca_certs: str | None = None
    max_queued_blocks: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.url, str):
            urls = [self.url]
        else:
            urls = list(self.url) if isinstance(self.url, (list, tuple)) else []
        if not urls or not all(isinstance(u, str) and u.startswith(("redis://", "rediss://")) for u in urls):
            raise ConfigError("url", self.url, 'must be "redis://host:port" or a list of them')
        _choice("mode", self.mode, ("write_back", "write_through"))
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not self.timeout > 0:
            raise ConfigError("timeout", self.timeout, "must be a number of seconds > 0")
        _positive_int("max_queued_blocks", self.max_queued_blocks)

    @property
    def urls(self) -> str | list[str]:
        """One URL (single server) or the list of cluster nodes."""
        return self.url if isinstance(self.url, str) else list(self.url)


@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """The offload scheduler's knobs (how blocks move between tiers in the background).

    ``low_watermark``: fraction of each memory tier the cleaner keeps free or clean (its next victims already
    copied below), so that an allocation rarely waits for a copy; 0 turns cleaning ahead of need off.
    ``clean_batch``: most blocks one cleaning pass copies.
    ``max_queued_blocks``: bound of the queue of demotions waiting for the disk, in blocks (None: 512 blocks or
    256 MiB of snapshots, whichever is more); when it is full, further demotions fall back to the next memory tier
    or are dropped and counted, serving never waits for the disk.
    ``writers``: threads writing queued demotions to the disk tier.
    ``background_cleaning``: False runs no cleaner threads: cleaning happens only when called
    (:meth:`KvBlockManager.run_cleaner_once <tiered_kv.manager.KvBlockManager.run_cleaner_once>`), which makes a
    test or a simulation step deterministically.
    """

    low_watermark: float = 0.25
    clean_batch: int = 64
    max_queued_blocks: int | None = None
    writers: int = 2
    background_cleaning: bool = True

    def __post_init__(self) -> None:
        w = self.low_watermark
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < 1:
            raise ConfigError("low_watermark", w, "must be a fraction in [0, 1)")
        _positive_int("clean_batch", self.clean_batch)
        if self.max_queued_blocks is not None:
            _positive_int("max_queued_blocks", self.max_queued_blocks)
        _positive_int("writers", self.writers)
        if not isinstance(self.background_cleaning, bool):
            raise ConfigError("background_cleaning", self.background_cleaning, "must be a bool")


@dataclass(frozen=True, kw_only=True)
class KvBlockManagerConfig:
    """Configuration of a :class:`~tiered_kv.manager.KvBlockManager`; at least one tier must be given.

    ``worker_id`` names this manager in the blocksets it exports (``export_local_blockset``), so that peers can tell
    whose blocks they hold; None gives ``host:pid:id``, unique per manager object.
    """

    model: ModelConfig
    device: LayoutConfig | None = None
    host: LayoutConfig | None = None
    disk: DiskConfig | None = None
    eviction: str = "arc"
    hash_algorithm: str = "sha256"
    namespace: str = "default"
    device_type: str = "auto"
    remote: RemoteConfig | None = None
    worker_id: str | int | None = None
    offload: OffloadConfig = OffloadConfig()

    def __post_init__(self) -> None:
        from .policies import available_policies

        # Enum members (HashAlgorithm, DeviceType, ...) are stored as their plain strings.
        for name in ("eviction", "hash_algorithm", "device_type"):
            object.__setattr__(self, name, plain(getattr(self, name)))

        if not isinstance(self.model, ModelConfig):
            raise ConfigError("model", self.model, "must be a ModelConfig")
        for name in ("device", "host"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, LayoutConfig):
                raise ConfigError(name, value, "must be a LayoutConfig or None")
        if self.disk is not None and not isinstance(self.disk, DiskConfig):
            raise ConfigError("disk", self.disk, "must be a DiskConfig or None")
        if self.remote is not None and not isinstance(self.remote, RemoteConfig):
            raise ConfigError("remote", self.remote, "must be a RemoteConfig or None")
        if not isinstance(self.offload, OffloadConfig):
            raise ConfigError("offload", self.offload, "must be an OffloadConfig")
        if self.device is None and self.host is None and self.disk is None:
            raise ConfigError("device", None, "at least one of device, host, disk must be given")
        _choice("eviction", self.eviction, available_policies())
        _choice("hash_algorithm", self.hash_algorithm, HASH_ALGORITHMS)
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ConfigError("namespace", self.namespace, "must be a non-empty str")
        _choice("device_type", self.device_type, DEVICE_TYPES)
        if self.device_type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device_type", self.device_type, "CUDA is not available in this process")
        w = self.worker_id
        if w is not None and not ((isinstance(w, str) and w) or (type(w) is int and w >= 0)):
            raise ConfigError("worker_id", w, "must be None, a non-empty str or a non-negative int")

    @property
    def resolved_device_type(self) -> str:
        """"cuda" or "cpu": what ``device_type="auto"`` means in this process."""
        if self.device_type == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device_type
