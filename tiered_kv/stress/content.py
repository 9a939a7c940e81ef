"""Block contents that are a pure function of the block's hash, so any block, on any tier, can be verified.

``content(h)`` is the 64-byte BLAKE2b digest of ``h`` tiled over the block and XORed with a fixed pseudo-random
pattern (the same for every block). The digest makes two blocks differ everywhere; the pattern makes every
position of one block differ from every other position, so a shifted, torn or half-swapped block fails too.
Producing it costs one small hash and two numpy passes, cheap enough to check every block a run touches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig

__all__ = ["BlockContent"]


@lru_cache(maxsize=8)
def _pattern(nbytes: int) -> np.ndarray:
    return np.random.default_rng(0x5EED_B10C).integers(0, 256, size=nbytes, dtype=np.uint8)


class BlockContent:
    """Derives, writes and checks the bytes of blocks of one model geometry.

    Args:
        model: the block geometry; bytes are laid out as ``[num_layers, outer_dim, page_size, inner_dim]``.
    """

    def __init__(self, model: ModelConfig) -> None:
        self.model = model
        self.nbytes = model.block_size_bytes
        self.slice_bytes = model.page_size * model.inner_dim * model.itemsize
        self._pattern = _pattern(self.nbytes)
        self._reps = -(-self.nbytes // 64)

    def expected(self, sequence_hash: bytes) -> np.ndarray:
        """The block's bytes (``uint8``, ``block_size_bytes`` long)."""
        digest = np.frombuffer(hashlib.blake2b(sequence_hash, digest_size=64).digest(), dtype=np.uint8)
        return np.bitwise_xor(np.tile(digest, self._reps)[: self.nbytes], self._pattern)

    def tensor(self, sequence_hash: bytes) -> torch.Tensor:
        """The block's data as a ``[layers, outer, page, inner]`` tensor of the model's dtype."""
        raw = torch.from_numpy(self.expected(sequence_hash))
        return raw.view(self.model.torch_dtype).reshape(self.model.block_shape)

    def fill(self, block: Any, sequence_hash: bytes) -> None:
        """Write the bytes of ``sequence_hash`` into a mutable block through its ``layer_view``s."""
        data = self.tensor(sequence_hash)
        for layer in range(self.model.num_layers):
            for outer in range(self.model.outer_dim):
                view = block.layer_view(layer, outer)
                view.copy_(data[layer, outer].to(view.device))

    def matches(self, block: Any, sequence_hash: bytes) -> bool:
        """Whether every ``layer_view`` of ``block`` holds exactly the bytes of ``sequence_hash``."""
        want = self.expected(sequence_hash)
        step = self.slice_bytes
        i = 0
        for layer in range(self.model.num_layers):
            for outer in range(self.model.outer_dim):
                got = _as_bytes(block.layer_view(layer, outer))
                if not np.array_equal(got, want[i * step : (i + 1) * step]):
                    return False
                i += 1
        return True

    def matches_data(self, data: torch.Tensor, hashes: Sequence[bytes]) -> list[int]:
        """Indices ``i`` where ``data[i]`` (a gathered ``[n, layers, outer, page, inner]`` batch) is wrong."""
        flat = _as_bytes(data).reshape(len(hashes), self.nbytes)
        return [i for i, h in enumerate(hashes) if not np.array_equal(flat[i], self.expected(h))]


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor (copied to the CPU when needed), flat ``uint8``."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()
