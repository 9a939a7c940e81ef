"""Token ids as compact little-endian uint32 bytes: how blocks record the tokens they were computed from."""

from __future__ import annotations

import sys
from array import array
from typing import Any

import numpy as np

__all__ = ["encode_tokens"]


def encode_tokens(tokens: Any, argument: str = "tokens") -> bytes:
    """Encode token ids (list/tuple of ints, 1-D numpy array or torch tensor) as little-endian uint32 bytes.

    Raises:
        ValueError: not a 1-D integer sequence, or an id outside ``[0, 2**32)``; the message names ``argument``.
    """
    if isinstance(tokens, (list, tuple)):
        try:
            arr = array("I", tokens)
        except (OverflowError, TypeError) as exc:
            raise ValueError(f"{argument}: token ids must be ints in [0, 2**32) ({exc})") from exc
        if any(type(t) is bool for t in tokens):
            raise ValueError(f"{argument}: token ids must be ints, not bools")
        if arr.itemsize != 4:
            arr = array("I", np.asarray(tokens, dtype=np.uint32).tobytes())
        if sys.byteorder == "big":
            arr.byteswap()
        return arr.tobytes()
    if type(tokens).__module__.startswith("torch"):
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"{argument}: expected a 1-D integer array, got {tokens.ndim}-D {tokens.dtype}")
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 2**32):
            raise ValueError(f"{argument}: token ids must be in [0, 2**32)")
        return tokens.astype("<u4").tobytes()
    raise ValueError(f"{argument}: expected a list/tuple of ints, a numpy array or a torch tensor, "
                     f"got {type(tokens).__name__}")
