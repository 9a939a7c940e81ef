"""Keys and the value format of the remote tier: a fixed 48-byte header, the block's token ids, its raw bytes.

Value layout (little-endian, ``struct`` format ``<4sBBH16sQQQ``)::

    offset size  field
    0      4     magic b"TKVR"
    4      1     format version (2; 1 had no token ids, its field 6 was reserved and 0)
    5      1     hash algorithm id (1 = sha256, 2 = xxh3_128)
    6      2     T: size of the token ids in bytes (uint32 each; 0 when the writer did not know them)
    8      16    identity digest: blake2b-128 of fingerprint, namespace and hash algorithm
    24     8     key tag: xxh3-64 of the block's sequence hash (a value copied to another key fails)
    32     8     payload size in bytes (== ModelConfig.block_size_bytes)
    40     8     xxh3-64 of the token ids and the payload
    48     T     token ids: what a match with ``tokens=`` compares (a hash collision is then a miss)
    48+T   ...   payload: the block's bytes, [num_layers, outer_dim, page_size, inner_dim] in the model dtype

Version 1 values stay readable (no token ids). Readers of version 1 see version 2 values as corrupt.

Every field is checked on every read; any mismatch makes the value a miss (and a ``corrupt`` count).

Keys are ``tkv:<namespace>:<fingerprint>:<sequence hash hex>``. The namespace is percent-encoded so that it
can contain neither ``:`` (ambiguity) nor ``{``/``}``: a Redis Cluster hash tag would pin every key of the
namespace to one slot. Keys therefore hash on their full text and spread over all cluster nodes.
"""

from __future__ import annotations

import hashlib
import struct
import urllib.parse
from enum import IntEnum

import xxhash

__all__ = [
    "FORMAT_VERSION",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "HASH_ALGORITHM_IDS",
    "Verdict",
    "identity_digest",
    "key_prefix",
    "pack_header",
    "payload_offset",
    "value_tokens",
    "verify_value",
]

MAGIC = b"TKVR"
#: Value format version written; values of READABLE_VERSIONS are read, others are a miss.
FORMAT_VERSION = 2
READABLE_VERSIONS = frozenset({1, 2})
HEADER = struct.Struct("<4sBBH16sQQQ")
HEADER_SIZE = HEADER.size  # 48
HASH_ALGORITHM_IDS = {"sha256": 1, "xxh3_128": 2}  # digest lengths: tiered_kv.hashing.HASH_LENGTHS
_KEY_SAFE = "-_.~/@+=,!*()"


class Verdict(IntEnum):
    """Outcome of checking one value read from Redis."""

    OK = 0
    MISSING = 1
    CORRUPT = 2


def identity_digest(fingerprint: str, namespace: str, hash_algorithm: str) -> bytes:
    """16 bytes binding a value to one model layout, namespace and hash algorithm."""
    doc = "\0".join(("tiered_kv-remote", fingerprint, namespace, hash_algorithm)).encode()
    return hashlib.blake2b(doc, digest_size=16).digest()


def key_prefix(namespace: str, fingerprint: str) -> bytes:
    """``tkv:<namespace>:<fingerprint>:`` with the namespace and fingerprint percent-encoded (no braces)."""
    ns = urllib.parse.quote(namespace, safe=_KEY_SAFE)
    fp = urllib.parse.quote(fingerprint, safe=_KEY_SAFE)
    return f"tkv:{ns}:{fp}:".encode()


def key_tag(sequence_hash: bytes) -> int:
    """The header's key tag for ``sequence_hash``."""
    return xxhash.xxh3_64_intdigest(sequence_hash)


def pack_header(
    identity: bytes, algorithm_id: int, sequence_hash: bytes, payload: memoryview | bytes, tokens: bytes = b""
) -> bytes:
    """The 48-byte header for ``tokens`` + ``payload`` stored under ``sequence_hash`` (the token ids follow it)."""
    if len(tokens) > 0xFFFF:
        raise ValueError(f"token ids of {len(tokens)} bytes do not fit the header (at most 65535)")
    digest = xxhash.xxh3_64(tokens)
    digest.update(payload)
    return HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        algorithm_id,
        len(tokens),
        identity,
        key_tag(sequence_hash),
        len(payload),
        digest.intdigest(),
    )


def value_tokens(value: bytes | bytearray) -> bytes | None:
    """The token ids of a verified value (None when its writer did not store them)."""
    size = HEADER.unpack_from(value, 0)[3]
    return bytes(value[HEADER_SIZE : HEADER_SIZE + size]) if size else None


def payload_offset(value: bytes | bytearray) -> int:
    """Where a verified value's block bytes start."""
    return HEADER_SIZE + int(HEADER.unpack_from(value, 0)[3])


def verify_value(
    value: object, identity: bytes, algorithm_id: int, sequence_hash: bytes, block_size: int
) -> tuple[Verdict, str]:
    """Check a value read from Redis; return the verdict and, for CORRUPT, why.

    Args:
        value: what GET returned (``None`` for a missing key).
        identity: :func:`identity_digest` of the reader.
        algorithm_id: the reader's hash algorithm id.
        sequence_hash: the hash the value was read under.
        block_size: the reader's ``ModelConfig.block_size_bytes``.
    """
    if value is None:
        return Verdict.MISSING, ""
    if not isinstance(value, (bytes, bytearray)):
        return Verdict.CORRUPT, f"unexpected reply type {type(value).__name__}"
    if len(value) < HEADER_SIZE:
        return Verdict.CORRUPT, f"value of {len(value)} bytes is shorter than the header"
    magic, version, algo, tokens_size, ident, tag, size, checksum = HEADER.unpack_from(value, 0)
    if magic != MAGIC:
        return Verdict.CORRUPT, f"bad magic {magic!r}"
    if version not in READABLE_VERSIONS:
        return Verdict.CORRUPT, f"format version {version} (this reader knows {sorted(READABLE_VERSIONS)})"
    if version == 1 and tokens_size:
        return Verdict.CORRUPT, "version 1 value with a nonzero reserved field"
    if algo != algorithm_id:
        return Verdict.CORRUPT, f"hash algorithm id {algo} != {algorithm_id}"
    if ident != identity:
        return Verdict.CORRUPT, "fingerprint/namespace digest differs (written for another model or namespace)"
    if tag != key_tag(sequence_hash):
        return Verdict.CORRUPT, "key tag differs (value was written under another hash)"
    body = len(value) - HEADER_SIZE - tokens_size
    if size != block_size or body != block_size:
        return Verdict.CORRUPT, f"payload of {body} bytes (header says {size}, want {block_size})"
    if tokens_size % 4:
        return Verdict.CORRUPT, f"token ids of {tokens_size} bytes (not whole uint32s)"
    if xxhash.xxh3_64_intdigest(memoryview(value)[HEADER_SIZE:]) != checksum:
        return Verdict.CORRUPT, "payload checksum mismatch"
    return Verdict.OK, ""
