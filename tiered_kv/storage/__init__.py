"""Where block bytes live: tensor arenas for the device and host tiers, files + registry for the disk tier."""

from .base import BlockStorage
from .memory import TensorArena

__all__ = ["BlockStorage", "TensorArena"]
