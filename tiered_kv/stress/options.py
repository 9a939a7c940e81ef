"""What a stress run does: :class:`StressOptions`, and the store configuration it implies.

The defaults force churn through all three tiers: a 32-block device tier and a 64-block host tier in front of a
1024-block disk tier, 8 KiB blocks (cheap disk I/O), and a working set of a few thousand blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..config import DiskConfig, KvBlockManagerConfig, LayoutConfig, ModelConfig
from ..errors import ConfigError
from .workload import WorkloadShape

__all__ = ["StressOptions", "PLANTED_BUGS", "DISK_QUEUE_BLOCKS"]

#: Bugs the harness can plant in the store it drives, to prove that it notices them (tests of the harness).
PLANTED_BUGS = ("wrong-bytes", "lose-blocks")

#: The offload scheduler's bound on blocks queued toward the disk tier (``OffloadScheduler.max_queued_blocks``).
DISK_QUEUE_BLOCKS = 512


@dataclass(frozen=True, kw_only=True)
class StressOptions:
    """Every parameter of a stress run.

    ``kill_every``: when set, the workload runs in a child process that is SIGKILLed about every that many
    seconds. ``faults``: the rate of injected disk faults (0 for none). ``disk_blocks`` defaults to 1024, or to
    4096 with ``kill_every`` (kill mode never lets the disk tier evict; see :mod:`tiered_kv.stress.crash`).
    """

    path: str
    duration: float = 10.0
    threads: int = 4
    tasks: int = 2
    seed: int = 0
    kill_every: float | None = None
    faults: float = 0.0
    device_blocks: int = 32
    host_blocks: int = 64
    disk_blocks: int | None = None
    num_layers: int = 2
    inner_dim: int = 64
    page_size: int = 16
    dtype: str = "float16"
    eviction: str = "arc"
    durability: str = "batch"
    shape: WorkloadShape = field(default_factory=WorkloadShape)
    check_interval: float = 0.2
    checkpoint_interval: float = 0.5
    plant_bug: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise ConfigError("path", self.path, "must be a non-empty path")
        if not self.duration > 0:
            raise ConfigError("duration", self.duration, "must be > 0")
        if self.threads < 0 or self.tasks < 0 or self.threads + self.tasks == 0:
            raise ConfigError("threads", self.threads, "threads and tasks must be >= 0 and not both 0")
        if self.kill_every is not None and not self.kill_every > 0:
            raise ConfigError("kill_every", self.kill_every, "must be > 0")
        if not 0.0 <= self.faults <= 1.0:
            raise ConfigError("faults", self.faults, "must be in [0, 1]")
        if self.plant_bug is not None and self.plant_bug not in PLANTED_BUGS:
            raise ConfigError("plant_bug", self.plant_bug, f"must be one of {', '.join(PLANTED_BUGS)}")
        if self.kill_every is not None and self.epoch_limit() < 1:
            raise ConfigError(
                "disk_blocks", self.disk_capacity,
                f"kill mode needs more than {self.disk_reserve()} disk blocks (device + host + the demotion queue)",
            )
        self.config()  # validates the geometry and tier sizes

    @property
    def tier_path(self) -> str:
        """Where the disk tier lives: ``PATH/tier`` (kill mode keeps its journals next to it)."""
        return os.path.join(os.fspath(self.path), "tier")

    @property
    def disk_capacity(self) -> int:
        """The disk tier's size in blocks."""
        if self.disk_blocks is not None:
            return self.disk_blocks
        return 4096 if self.kill_every is not None else 1024

    def disk_reserve(self) -> int:
        """Upper bound of blocks that can still reach the disk after the workload pauses (kill mode)."""
        biggest = max(self.shape.max_context_blocks, self.shape.document_blocks)
        return self.device_blocks + self.host_blocks + DISK_QUEUE_BLOCKS + 2 * biggest + 64

    def epoch_limit(self) -> int:
        """Kill mode: disk occupancy at which a child stops its workload so that the disk never evicts."""
        return self.disk_capacity - self.disk_reserve()

    def model(self) -> ModelConfig:
        """The block geometry."""
        return ModelConfig(num_layers=self.num_layers, inner_dim=self.inner_dim, page_size=self.page_size,
                           dtype=self.dtype)

    def config(self, *, disk_only: bool = False) -> KvBlockManagerConfig:
        """The store's configuration (``disk_only``: just the disk tier, for verifying it after a run)."""
        disk = DiskConfig(path=self.tier_path, num_blocks=self.disk_capacity, backend="posix",
                          durability=self.durability)
        if disk_only:
            return KvBlockManagerConfig(model=self.model(), disk=disk, eviction=self.eviction)
        return KvBlockManagerConfig(
            model=self.model(),
            device=LayoutConfig(num_blocks=self.device_blocks),
            host=LayoutConfig(num_blocks=self.host_blocks),
            disk=disk,
            eviction=self.eviction,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (passed to the child process)."""
        from dataclasses import asdict

        doc = asdict(self)
        doc["path"] = os.fspath(self.path)
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> StressOptions:
        """Inverse of :meth:`to_dict`."""
        doc = dict(doc)
        doc["shape"] = WorkloadShape(**doc["shape"])
        return cls(**doc)
