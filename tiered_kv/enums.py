"""String enums for the names the configuration and the calls accept (seed 003's ``DeviceType``/``DType``, seed
002's ``HashAlgorithm``, seed 001's ``EvictionMode``).

Each member's value is the plain string the engine uses, and every place that accepts the string accepts the member
too: it is normalised to the plain string on the way in (:func:`plain`), so configurations, fingerprints and
msgpack documents never carry enum objects. A plain ``str`` subclass is not enough on its own: ``Enum`` hashes a
member by its *name*, so ``{"sha256": 32}[HashAlgorithm.SHA256]`` would miss.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = ["DType", "DeviceType", "EvictionMode", "HashAlgorithm", "plain"]

T = TypeVar("T")


class DeviceType(str, Enum):
    """Where the device tier lives (``KvBlockManagerConfig.device_type``)."""

    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"

    def __str__(self) -> str:
        return self.value


class DType(str, Enum):
    """KV element type (``ModelConfig.dtype``)."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    FLOAT8_E4M3FN = "float8_e4m3fn"
    FLOAT8_E5M2 = "float8_e5m2"
    INT8 = "int8"
    UINT8 = "uint8"

    def __str__(self) -> str:
        return self.value


class HashAlgorithm(str, Enum):
    """Block hash algorithm (``KvBlockManagerConfig.hash_algorithm``, ``compute_sequence_hashes(algorithm=)``)."""

    SHA256 = "sha256"
    XXH3_128 = "xxh3_128"

    def __str__(self) -> str:
        return self.value


class EvictionMode(str, Enum):
    """How much ``trigger_eviction`` evicts (seed 001's memory-pressure modes).

    ``NORMAL`` frees inactive blocks until a quarter of the tier is free; ``AGGRESSIVE`` evicts every inactive
    block.
    """

    NORMAL = "normal"
    AGGRESSIVE = "aggressive"

    def __str__(self) -> str:
        return self.value


def plain(value: T) -> T | str:
    """``value.value`` for a string enum member (of any str Enum, not only these), else ``value`` unchanged."""
    if isinstance(value, Enum) and isinstance(value, str):
        return str(value.value)
    return value
