"""Chained block hashes of token sequences: the keys every tier stores blocks under.

A token sequence is cut into blocks of ``block_size`` tokens; each FULL block gets one hash and a trailing
partial block gets none. Hashes are chained, so hash ``i`` covers the namespace, the salt, ``extra_keys[i]``
and every token of blocks ``0..i``::

    root   = H(b"tiered_kv.seqhash.v1\\0" || lp(algorithm) || lp(namespace) || enc_salt(salt))
    hash_i = H(hash_{i-1} || enc_extra(extra_keys[i]) || tokens of block i as little-endian uint32)
             with hash_{-1} = root (or the caller's ``parent``)

where ``lp(x)`` is the 8-byte little-endian length of ``x`` followed by ``x`` (str as UTF-8),
``enc_salt(None) = 0x00`` and ``enc_salt(s) = 0x01 || lp(s)``, ``enc_extra`` is a one-byte type tag (None 0x00,
bytes 0x01, str 0x02, int 0x03, tuple 0x04) followed by ``lp(bytes)``, ``lp(utf-8)``, ``lp(signed little-endian
two's complement in bit_length // 8 + 1 bytes)``, or an 8-byte element count and the elements; and ``H`` is
SHA-256 (32-byte digests, the default) or XXH3-128 (16-byte digests, faster, not collision-resistant
against an adversary). Every field is fixed-width or length-prefixed, so distinct inputs never encode to
the same message: ``hash_{i-1}`` has the algorithm's digest length, the extra-key encoding is self-delimiting
(type tag, then lengths), and the tokens fill the rest. Nothing depends on Python's ``hash()``, so the same
inputs give the same hashes in every process, whatever ``PYTHONHASHSEED`` is.

Encoding decisions (part of the on-disk format; changing any of them is a breaking change):

* ``salt=None`` and ``salt=b""`` are distinct; a str salt hashes exactly like its UTF-8 bytes
  (``salt="t1"`` == ``salt=b"t1"``), since a salt is an opaque tenant/adapter label that may arrive either way.
* ``extra_keys`` entries ARE type-tagged: ``"1"``, ``b"1"`` and ``1`` give three different hashes.
  ``extra_keys=None`` is the same as ``extra_keys=[None] * n_full_blocks``. numpy integers count as ints;
  bools are rejected (``True`` would otherwise alias ``1``), as are nested tuples and None inside a tuple.
* ``block_size`` is not in the root: chains of different block sizes cannot collide anyway, because the
  block messages have different lengths.

Speed: token ids are converted once, in C (``array.array`` for lists, ``astype`` for numpy/torch), framed
into per-block ``bytes`` by numpy, and the chain is one list comprehension of ``digest(parent + block)``.
No per-token Python object is created. Each digest is then wrapped in a :class:`SequenceHash` that points at
its parent; that object (and its attribute dict) is the one per-block cost beyond the digest itself.
"""

from __future__ import annotations

import hashlib
import operator
import struct
import sys
from array import array
from collections.abc import Hashable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from functools import lru_cache
from itertools import chain
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import numpy as np
import xxhash

from .enums import plain

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch

__all__ = [
    "SequenceHash",
    "compute_sequence_hashes",
    "compute_prefix_match",
    "compute_cache_keys",
    "HASH_LENGTHS",
    "check_hash",
    "hash_length",
    "validate_hashes",
]


class SequenceHash(bytes):
    """A block hash: an immutable ``bytes`` subclass (32 bytes for sha256, 16 for xxh3_128) that knows its parent.

    It equals, hashes, orders and slices exactly like the plain bytes (``h == bytes(h)``,
    ``hash(h) == hash(bytes(h))``), so it works as a dict key next to plain bytes. :attr:`parent` is the hash of the
    previous block of the same sequence, or None for the first block and for a hash made from plain bytes
    (``SequenceHash(b)``). Use :meth:`with_parent` to make one with a parent.

    Every hash returned by :func:`compute_sequence_hashes` and :func:`compute_cache_keys` has its parent set:
    ``hashes[i].parent == hashes[i - 1]`` (as plain ``bytes``), and ``hashes[0].parent`` is None, or the
    ``parent`` argument a chain was continued from. Pickling and copying keep the parent.
    """

    # Cost: a per-hash attribute dict would double the cost of hashing (an object and a dict per block, on top
    # of a ~90 ns xxh3 block). Instead each run of up to _LINEAGE_SPAN consecutive hashes of a chain shares ONE
    # instance __dict__ holding one _Lineage, which maps each of them to its parent, built on the first look-up.
    # (bytes subclasses cannot have __slots__ fields, so the __dict__ is the only per-object storage.) The span
    # bounds what one kept hash keeps alive: its run's digests, not the whole chain. Parents are plain digests,
    # so nothing points back at the SequenceHash objects: no reference cycles, freed by reference counting.
    _lineage: _Lineage | None = None

    @property
    def parent(self) -> bytes | None:
        """The previous block's hash, or None for a chain head."""
        lineage = self._lineage
        return None if lineage is None else lineage.parent_of(self)

    @classmethod
    def with_parent(
        cls, value: bytes | bytearray | memoryview, parent: bytes | bytearray | memoryview | None
    ) -> SequenceHash:
        """A hash with the given bytes and parent.

        Args:
            value: the hash's bytes.
            parent: the previous block's hash, or None for the first block of a sequence. A ``bytes``
                instance (plain or a :class:`SequenceHash`) is kept as is; other bytes-like values are copied.

        Raises:
            ValueError: ``value`` or ``parent`` is not bytes-like.
        """
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ValueError(f"value: expected bytes, got {type(value).__name__}")
        h = cls(value)
        if parent is not None:
            if isinstance(parent, (bytearray, memoryview)):
                parent = bytes(parent)
            elif not isinstance(parent, bytes):
                raise ValueError(f"parent: expected None or bytes, got {type(parent).__name__}")
            h._lineage = _Lineage([bytes(h)], parent)
        return h

    def __reduce__(self) -> tuple[Any, ...]:
        # The parent goes as plain bytes: pickling one hash of a long chain stores one parent, never the chain.
        parent = self.parent
        return (_sequence_hash, (bytes(self), None if parent is None else bytes(parent)))

    def __copy__(self) -> SequenceHash:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> SequenceHash:
        return self


class _Lineage:
    """The parents of one chain of hashes, shared by all of them (see :class:`SequenceHash`)."""

    __slots__ = ("_digests", "_first", "_parents")

    def __init__(self, digests: list[bytes], first: bytes | None) -> None:
        self._digests = digests
        self._first = first
        self._parents: dict[bytes, bytes | None] | None = None

    def parent_of(self, h: bytes) -> bytes | None:
        return self.table()[h]

    def table(self) -> dict[bytes, bytes | None]:
        """Each hash of the run -> its parent."""
        parents = self._parents
        if parents is None:
            # One C-level pass on the first look-up; most chains never have a parent read. Two threads racing
            # here build equal maps, and the assignment is atomic.
            d = self._digests
            parents = self._parents = dict(zip(d, chain((self._first,), d)))
        return parents


def parents_of(hashes: Iterable[bytes]) -> list[bytes | None]:
    """``[getattr(h, "parent", None) for h in hashes]``, a lineage look-up per run instead of a property call per
    hash (what a pool does for every registration without ``parents=``)."""
    out: list[bytes | None] = []
    add = out.append
    last: _Lineage | None = None
    table: dict[bytes, bytes | None] = {}
    for h in hashes:
        lineage = getattr(h, "_lineage", None)
        if lineage is None:
            add(getattr(h, "parent", None))  # plain bytes: None; another type may carry one
            continue
        if lineage is not last:
            last = lineage
            table = lineage.table()
        add(table[h])
    return out


def _sequence_hash(value: bytes, parent: bytes | None) -> SequenceHash:
    """Unpickle a :class:`SequenceHash` (module level, so that pickles name a stable function)."""
    return SequenceHash.with_parent(value, parent)


TokenIds: TypeAlias = "Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor"
ExtraKey: TypeAlias = "str | bytes | int | np.integer[Any] | tuple[str | bytes | int | np.integer[Any], ...] | None"

RequestId = TypeVar("RequestId", bound=Hashable)

#: Digest length in bytes of each hash algorithm: the one table of them (:func:`hash_length` looks names up here).
HASH_LENGTHS: Mapping[str, int] = {"sha256": 32, "xxh3_128": 16}
_ROOT_MAGIC = b"tiered_kv.seqhash.v1\0"
_TOKEN_LIMIT = 2**32

# Extra-key type tags. Lengths and counts are unsigned 64-bit little-endian; ints are signed two's complement,
# little-endian, in bit_length // 8 + 1 bytes (deterministic; the length prefix makes it unambiguous).
_TAG_NONE = b"\x00"
_TAG_BYTES = b"\x01"
_TAG_STR = b"\x02"
_TAG_INT = b"\x03"
_TAG_TUPLE = b"\x04"
_U64 = struct.Struct("<Q")

# array.array typecode holding a C uint32 (itemsize 4); "I" on every mainstream platform.
_U32_TYPECODE: str | None = next((tc for tc in ("I", "L") if array(tc).itemsize == 4), None)


def hash_length(algorithm: str) -> int:
    """Return the digest length in bytes of a hash algorithm.

    Args:
        algorithm: ``"sha256"`` or ``"xxh3_128"``.

    Returns:
        32 for sha256, 16 for xxh3_128.

    Raises:
        ValueError: the algorithm is unknown.
    """
    try:
        return HASH_LENGTHS[plain(algorithm)]
    except (KeyError, TypeError):
        raise ValueError(
            f"algorithm: unknown hash algorithm {algorithm!r} (expected one of {', '.join(map(repr, HASH_LENGTHS))})"
        ) from None


def compute_sequence_hashes(
    token_ids: TokenIds,
    block_size: int,
    *,
    algorithm: str = "sha256",
    namespace: str = "default",
    salt: str | bytes | None = None,
    extra_keys: Sequence[ExtraKey] | None = None,
    parent: bytes | bytearray | memoryview | None = None,
) -> list[SequenceHash]:
    """Hash a token sequence into one chained hash per full block.

    Args:
        token_ids: a list/tuple of ints, or a 1-D numpy array or torch tensor of an integer dtype; every id
            in ``[0, 2**32)``. Bools and floats are rejected.
        block_size: tokens per block (the pool's page size); a positive int.
        algorithm: ``"sha256"`` (32-byte hashes) or ``"xxh3_128"`` (16-byte hashes).
        namespace: model name/revision; part of every hash.
        salt: None, or a str/bytes label (str hashes like its UTF-8 bytes; None differs from ``b""``).
        extra_keys: None, or one entry per FULL block, each None, a str/bytes/int, or a flat tuple of those
            (e.g. image hashes or a LoRA id for the tokens of that block).
        parent: continue a chain from this hash (a previous result's last element) instead of the root of
            ``namespace``/``salt``, which are then validated but unused. Must have the algorithm's length.

    Returns:
        ``len(token_ids) // block_size`` hashes; hash ``i`` covers blocks ``0..i``.

    Raises:
        ValueError: any argument is malformed; the message names it (and the index of a bad element).
    """
    algorithm = plain(algorithm)  # a HashAlgorithm member hashes like its string
    hash_length(algorithm)
    _check_block_size(block_size)
    start = _start_hash(algorithm, namespace, salt, parent)
    digests = _hash_tokens(token_ids, block_size, algorithm, start, extra_keys, "token_ids", "extra_keys")
    # The first block's parent is the caller's hash object itself when it is bytes (a SequenceHash keeps its chain).
    return _linked(digests, None if parent is None else parent if isinstance(parent, bytes) else start)


def compute_cache_keys(
    request_ids: Sequence[RequestId],
    token_ids_list: Sequence[TokenIds],
    block_size: int,
    *,
    algorithm: str = "sha256",
    namespace: str = "default",
    salt: str | bytes | None = None,
    extra_keys_list: Sequence[Sequence[ExtraKey] | None] | None = None,
) -> dict[RequestId, list[SequenceHash]]:
    """Hash many requests at once.

    Args:
        request_ids: one distinct, hashable id per request.
        token_ids_list: the token ids of each request (any form :func:`compute_sequence_hashes` accepts).
        block_size: tokens per block.
        algorithm: see :func:`compute_sequence_hashes`.
        namespace: see :func:`compute_sequence_hashes`.
        salt: see :func:`compute_sequence_hashes`; shared by every request.
        extra_keys_list: None, or one ``extra_keys`` value (None or a per-full-block sequence) per request.

    Returns:
        A dict mapping each request id to its block hashes, in ``request_ids`` order.

    Raises:
        ValueError: a malformed argument, lengths that differ, or a duplicate request id; the message names
            the argument and index (``token_ids_list[2][7]: ...``).
    """
    algorithm = plain(algorithm)
    hash_length(algorithm)
    _check_block_size(block_size)
    root = _start_hash(algorithm, namespace, salt, None)
    _check_sequence(request_ids, "request_ids")
    _check_sequence(token_ids_list, "token_ids_list")
    n = len(request_ids)
    if len(token_ids_list) != n:
        raise ValueError(f"token_ids_list: expected {n} entries (one per request id), got {len(token_ids_list)}")
    if extra_keys_list is not None:
        _check_sequence(extra_keys_list, "extra_keys_list")
        if len(extra_keys_list) != n:
            raise ValueError(f"extra_keys_list: expected {n} entries (one per request id), got {len(extra_keys_list)}")
    out: dict[RequestId, list[SequenceHash]] = {}
    for i, request_id in enumerate(request_ids):
        try:
            seen = request_id in out
        except TypeError:
            raise ValueError(
                f"request_ids[{i}]: request id must be hashable, got {type(request_id).__name__}"
            ) from None
        if seen:
            raise ValueError(f"request_ids[{i}]: duplicate request id {request_id!r}")
        extra = None if extra_keys_list is None else extra_keys_list[i]
        digests = _hash_tokens(
            token_ids_list[i], block_size, algorithm, root, extra, f"token_ids_list[{i}]", f"extra_keys_list[{i}]"
        )
        out[request_id] = _linked(digests, None)
    return out


def compute_prefix_match(
    cached_hashes: AbstractSet[Any] | Mapping[Any, Any] | Sequence[Any],
    request_hashes: Sequence[Any],
) -> int:
    """Count how many leading ``request_hashes`` are cached.

    Two modes, chosen by the type of ``cached_hashes``:

    * a Set or Mapping (``set``, ``frozenset``, ``dict``, ``dict.keys()``): the number of leading request
      hashes present in it; a linear scan that stops at the first miss.
    * a Sequence (``list``, ``tuple``): the length of the common prefix of the two sequences, found by binary
      search. This is valid because hashes are chained: ``cached[i] == request[i]`` implies equal tokens,
      namespace and salt for all of blocks ``0..i``, hence ``cached[j] == request[j]`` for every ``j < i``, so
      "equal at i" is monotone (true up to some index, false after). For sequences that are not prefix-chained
      the result is unspecified.

    Args:
        cached_hashes: the hashes held (a Set/Mapping), or another request's hash sequence.
        request_hashes: the request's hashes, in block order.

    Returns:
        The number of leading request hashes matched, in ``[0, len(request_hashes)]``.

    Raises:
        ValueError: an argument has an unsupported type.
    """
    _check_sequence(request_hashes, "request_hashes")
    if isinstance(cached_hashes, (AbstractSet, Mapping)):
        for i, h in enumerate(request_hashes):
            if h not in cached_hashes:
                return i
        return len(request_hashes)
    if isinstance(cached_hashes, Sequence) and not isinstance(cached_hashes, (str, bytes, bytearray)):
        lo, hi = 0, min(len(cached_hashes), len(request_hashes))
        while lo < hi:
            mid = (lo + hi) // 2
            if cached_hashes[mid] == request_hashes[mid]:
                lo = mid + 1
            else:
                hi = mid
        return lo
    raise ValueError(
        f"cached_hashes: expected a Set, Mapping or Sequence of hashes, got {type(cached_hashes).__name__}"
    )


def validate_hashes(hashes: Sequence[Any], algorithm: str, argument: str = "hashes") -> list[bytes]:
    """Check a list of block hashes and return them as a list of ``bytes``.

    Args:
        hashes: a list or tuple of ``bytes`` (``bytearray``/``memoryview`` elements are converted to bytes).
        algorithm: the algorithm the hashes were made with; fixes their length.
        argument: the name used in error messages.

    Returns:
        A new list of ``bytes``: ``bytes`` elements (a :class:`SequenceHash` included, keeping its parent) as given,
        ``bytearray``/``memoryview`` ones converted to plain ``bytes``.

    Raises:
        ValueError: ``hashes`` is not a list/tuple, or an element is not bytes-like or has the wrong length;
            the message names the first bad element (``"hashes[3]: expected 32 bytes, got 16"``).
    """
    size = hash_length(algorithm)
    if not isinstance(hashes, (list, tuple)):
        raise ValueError(f"{argument}: expected a list or tuple of {size}-byte hashes, got {type(hashes).__name__}")
    # Fast path: the common case is already a list of bytes of the right length; both checks run in C.
    if set(map(type, hashes)) <= _HASH_TYPES and set(map(len, hashes)) <= {size}:
        return list(hashes)
    return [_checked(h, size, f"{argument}[{i}]") for i, h in enumerate(hashes)]


def plain_hashes(hashes: Sequence[Any], size: int, argument: str = "hashes") -> list[bytes]:
    """Check a sequence of ``size``-byte block hashes and return them as a list of plain ``bytes``.

    What a pool stores: bytes subclasses (:class:`SequenceHash`, whose parent the caller took already) and
    buffers become plain ``bytes``, so that a stored key never keeps a chain of parents alive.

    Raises:
        ValueError: not a sequence, or an element not bytes-like or of another length (named by ``argument[i]``).
    """
    kind = type(hashes)
    if kind is not list and kind is not tuple and (
        isinstance(hashes, (bytes, bytearray, str)) or not isinstance(hashes, Sequence)
    ):  # (the ABC check costs a microsecond: lists and tuples skip it)
        raise ValueError(f"{argument}: expected a sequence of hashes, got {type(hashes).__name__}")
    out = list(hashes)
    # Batch checks at C speed; the per-hash path only runs to convert or to name the first bad one.
    types = set(map(type, out))
    if types - {bytes} and all(issubclass(t, (bytes, bytearray, memoryview)) for t in types):
        out = list(map(bytes, out))  # SequenceHash, bytearray, ...: plain bytes, at C speed
        types = {bytes}
    if types <= {bytes} and set(map(len, out)) <= {size}:
        return out
    return [bytes(_checked(h, size, f"{argument}[{i}]")) for i, h in enumerate(out)]


def check_hash(value: object, algorithm: str, argument: str = "sequence hash") -> bytes:
    """Check one block hash and return it as ``bytes`` (the one check every tier's storage applies).

    Args:
        value: ``bytes`` (a :class:`SequenceHash` included, returned as it is), or a ``bytearray``/``memoryview``
            (converted to ``bytes``).
        algorithm: the algorithm the hash was made with; fixes its length.
        argument: what to call the value in the error message.

    Raises:
        ValueError: not bytes-like, or the wrong length (``"sequence hash: expected 32 bytes, got 16"``).
    """
    return _checked(value, hash_length(algorithm), argument)


def _checked(h: object, size: int, argument: str) -> bytes:
    if isinstance(h, bytes):
        b = h
    elif isinstance(h, (bytearray, memoryview)):
        b = bytes(h)
    else:
        raise ValueError(f"{argument}: expected {size} bytes, got {type(h).__name__}")
    if len(b) != size:
        raise ValueError(f"{argument}: expected {size} bytes, got {len(b)}")
    return b


# ----------------------------------------------------------------------------------------------------------------
# internals

_HASH_TYPES = frozenset({bytes, SequenceHash})
_LINEAGE_SPAN = 64  # hashes per shared _Lineage: one dict per 64 blocks; a kept hash keeps <= 64 digests alive


def _check_block_size(block_size: object) -> None:
    if type(block_size) is not int or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _check_sequence(value: object, argument: str) -> None:
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes, bytearray)):
        raise ValueError(f"{argument}: expected a list or tuple, got {type(value).__name__}")


def _utf8(value: str, argument: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{argument}: not encodable as UTF-8 ({exc.reason})") from None


def _start_hash(algorithm: str, namespace: object, salt: object, parent: object) -> bytes:
    """Validate namespace/salt/parent; return the hash the chain starts from."""
    if not isinstance(namespace, str):
        raise ValueError(f"namespace must be a str, got {type(namespace).__name__}")
    ns = _utf8(namespace, "namespace")
    if salt is None:
        salt_bytes = None
    elif isinstance(salt, str):
        salt_bytes = _utf8(salt, "salt")
    elif isinstance(salt, bytes):
        salt_bytes = salt
    else:
        raise ValueError(f"salt must be None, str or bytes, got {type(salt).__name__}")
    if parent is None:
        return _root_hash(algorithm, ns, salt_bytes)
    size = HASH_LENGTHS[algorithm]
    if not isinstance(parent, (bytes, bytearray, memoryview)):
        raise ValueError(f"parent: expected None or a {size}-byte {algorithm} hash, got {type(parent).__name__}")
    parent = bytes(parent)
    if len(parent) != size:
        raise ValueError(f"parent: expected {size} bytes for {algorithm}, got {len(parent)}")
    return parent


def _digest(algorithm: str, data: bytes) -> bytes:
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128_digest(data)
    return hashlib.sha256(data).digest()


def _lp(data: bytes) -> bytes:
    return _U64.pack(len(data)) + data


@lru_cache(maxsize=256)
def _root_hash(algorithm: str, namespace: bytes, salt: bytes | None) -> bytes:
    salt_enc = b"\x00" if salt is None else b"\x01" + _lp(salt)
    return _digest(algorithm, _ROOT_MAGIC + _lp(algorithm.encode("ascii")) + _lp(namespace) + salt_enc)


def _hash_tokens(
    token_ids: object,
    block_size: int,
    algorithm: str,
    start: bytes,
    extra_keys: object,
    token_arg: str,
    extra_arg: str,
) -> list[bytes]:
    tokens = _as_uint32(token_ids, token_arg)
    n_blocks = len(tokens) // block_size
    if extra_keys is None:
        prefixes = None
        frames = _frames(tokens, n_blocks, block_size, _TAG_NONE)
    else:
        prefixes = _encode_extra_keys(extra_keys, n_blocks, extra_arg)
        frames = _frames(tokens, n_blocks, block_size, b"")
    return _chain(algorithm, start, frames, prefixes)


def _linked(digests: list[bytes], first_parent: bytes | None) -> list[SequenceHash]:
    """Wrap a chain's digests as SequenceHash objects; each run of _LINEAGE_SPAN shares one _Lineage (parents)."""
    out = list(map(SequenceHash, digests))
    parent = first_parent
    for start in range(0, len(out), _LINEAGE_SPAN):
        run = digests[start : start + _LINEAGE_SPAN]
        shared = {"_lineage": _Lineage(run, parent)}
        for h in out[start : start + _LINEAGE_SPAN]:
            h.__dict__ = shared  # no per-hash dict: see SequenceHash
        parent = run[-1]
    return out


def _chain(algorithm: str, start: bytes, frames: list[bytes], prefixes: list[bytes] | None) -> list[bytes]:
    # The hot loop: one concatenation and one digest call per block, everything prebound.
    p = start
    if algorithm == "xxh3_128":
        digest = xxhash.xxh3_128_digest
        if prefixes is None:
            return [p := digest(p + f) for f in frames]
        return [p := digest(p + e + f) for e, f in zip(prefixes, frames, strict=True)]
    sha256 = hashlib.sha256
    if prefixes is None:
        return [p := sha256(p + f).digest() for f in frames]
    return [p := sha256(p + e + f).digest() for e, f in zip(prefixes, frames, strict=True)]


def _frames(tokens: npt.NDArray[np.uint32], n_blocks: int, block_size: int, prefix: bytes) -> list[bytes]:
    """Cut the first ``n_blocks`` blocks into ``bytes`` objects: ``prefix`` + block tokens as little-endian u32."""
    if n_blocks == 0:
        return []
    # "<u4" pins little-endian: a no-op on little-endian hosts, the byte swap on big-endian ones (array.array
    # and numpy arrays arrive in native order).
    words = np.ascontiguousarray(tokens[: n_blocks * block_size], dtype="<u4").reshape(n_blocks, block_size)
    width = len(prefix) + 4 * block_size
    buf = np.empty((n_blocks, width), dtype=np.uint8)
    if prefix:
        buf[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    buf[:, len(prefix) :] = words.view(np.uint8)
    # A void dtype of the row width turns each row into one bytes object, in C.
    frames: list[bytes] = buf.view(f"V{width}").ravel().tolist()
    return frames


def _as_uint32(token_ids: object, argument: str) -> npt.NDArray[np.uint32]:
    """Validate token ids and return them as a 1-D uint32 numpy array (any byte order)."""
    if isinstance(token_ids, (list, tuple)):
        return _list_as_uint32(token_ids, argument)
    if isinstance(token_ids, np.ndarray):
        return _ndarray_as_uint32(token_ids, argument)
    torch = sys.modules.get("torch")  # a tensor can only exist if torch was imported; never import it here
    if torch is not None and isinstance(token_ids, torch.Tensor):
        return _tensor_as_uint32(token_ids, torch, argument)
    raise ValueError(
        f"{argument}: expected a list/tuple of ints or a 1-D numpy array or torch tensor of integers, "
        f"got {type(token_ids).__name__}"
    )


def _list_as_uint32(tokens: list[Any] | tuple[Any, ...], argument: str) -> npt.NDArray[np.uint32]:
    if _U32_TYPECODE is None:  # pragma: no cover - no such platform in CI
        for i, t in enumerate(tokens):
            _check_token(t, i, argument)
        return np.array([operator.index(t) for t in tokens], dtype=np.uint32)
    try:
        # One C-level pass: rejects non-integers (TypeError) and values outside [0, 2**32) (OverflowError).
        # fromlist() indexes the list directly and is ~1.6x faster than the constructor's generic sequence path.
        if isinstance(tokens, list):
            arr = array(_U32_TYPECODE)
            arr.fromlist(tokens)
        else:
            arr = array(_U32_TYPECODE, tokens)
    except Exception as exc:
        for i, t in enumerate(tokens):
            _check_token(t, i, argument)
        raise ValueError(f"{argument}: cannot convert to uint32 token ids ({exc})") from exc
    out = np.frombuffer(arr, dtype=np.uint32)
    # array.array accepts bools (an int subclass) as 0/1; only positions holding 0 or 1 can be one, and real
    # sequences hold few of those, so look at just those objects instead of typing every token.
    maybe = np.flatnonzero(out <= 1).tolist()
    if maybe:
        picked = operator.itemgetter(*maybe)(tokens)
        if bool in set(map(type, picked if len(maybe) > 1 else (picked,))):
            for i in maybe:
                _check_token(tokens[i], i, argument)
    return out


def _check_token(token: object, index: int, argument: str) -> None:
    if isinstance(token, (bool, np.bool_)):
        raise ValueError(f"{argument}[{index}]: expected an int token id, got bool {token!r}")
    try:
        value = operator.index(token)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"{argument}[{index}]: expected an int token id, got {type(token).__name__} {token!r}"
        ) from None
    if not 0 <= value < _TOKEN_LIMIT:
        raise ValueError(f"{argument}[{index}]: {value} is out of range [0, 2**32)")


def _ndarray_as_uint32(a: npt.NDArray[Any], argument: str) -> npt.NDArray[np.uint32]:
    if a.ndim != 1:
        raise ValueError(f"{argument}: expected a 1-D array, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"{argument}: expected an integer dtype, got {a.dtype}")
    may_overflow = a.dtype.kind == "i" or a.dtype.itemsize > 4
    if may_overflow and a.size and (int(a.min()) < 0 or int(a.max()) >= _TOKEN_LIMIT):
        bad = int(np.flatnonzero((a < 0) | (a >= _TOKEN_LIMIT))[0])
        raise ValueError(f"{argument}[{bad}]: {int(a[bad])} is out of range [0, 2**32)")
    return a.astype(np.uint32, copy=False)


def _tensor_as_uint32(t: torch.Tensor, torch: Any, argument: str) -> npt.NDArray[np.uint32]:
    if t.dim() != 1:
        raise ValueError(f"{argument}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{argument}: expected an integer dtype, got {t.dtype}")
    if t.layout != torch.strided:
        raise ValueError(f"{argument}: expected a dense tensor, got layout {t.layout}")
    t = t.detach().cpu()
    try:
        a = t.numpy()
    except (TypeError, RuntimeError):  # dtypes numpy cannot view (none of the integer ones today)
        a = t.to(torch.int64).numpy()
    return _ndarray_as_uint32(a, argument)


def _encode_extra_keys(extra_keys: object, n_blocks: int, argument: str) -> list[bytes]:
    _check_sequence(extra_keys, argument)
    assert isinstance(extra_keys, Sequence)
    if len(extra_keys) != n_blocks:
        raise ValueError(f"{argument}: expected {n_blocks} entries (one per full block), got {len(extra_keys)}")
    out: list[bytes] = []
    for i, key in enumerate(extra_keys):
        if key is None:
            out.append(_TAG_NONE)
        elif isinstance(key, tuple):
            parts = [_TAG_TUPLE, _U64.pack(len(key))]
            parts.extend(_encode_scalar(k, f"{argument}[{i}][{j}]", in_tuple=True) for j, k in enumerate(key))
            out.append(b"".join(parts))
        else:
            out.append(_encode_scalar(key, f"{argument}[{i}]"))
    return out


def _encode_scalar(key: object, argument: str, *, in_tuple: bool = False) -> bytes:
    if isinstance(key, bytes):
        return _TAG_BYTES + _lp(key)
    if isinstance(key, str):
        return _TAG_STR + _lp(_utf8(key, argument))
    # bool is an int subclass but True must not alias 1; numpy integers are fine (np.integer is not a bool)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        value = int(key)
        return _TAG_INT + _lp(value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True))
    expected = "str, bytes or int (tuples are flat)" if in_tuple else "None, str, bytes, int or a tuple of those"
    raise ValueError(f"{argument}: expected {expected}, got {type(key).__name__}")
