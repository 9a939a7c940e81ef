"""Tests for tiered_kv.hashing: chained block hashes, prefix matching, batch keys, hash validation."""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from tiered_kv.hashing import (
    SequenceHash,
    compute_cache_keys,
    compute_prefix_match,
    compute_sequence_hashes,
    hash_length,
    validate_hashes,
)

ALGORITHMS = ("sha256", "xxh3_128")

# ---------------------------------------------------------------------------------------------------------------
# An independent, deliberately naive transcription of the documented format (module docstring of
# tiered_kv.hashing). If this and the implementation ever disagree, either the docs or the on-disk format moved.


def _lp(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _ref_scalar(k: Any) -> bytes:
    if isinstance(k, bytes):
        return b"\x01" + _lp(k)
    if isinstance(k, str):
        return b"\x02" + _lp(k.encode("utf-8"))
    v = int(k)
    return b"\x03" + _lp(v.to_bytes(v.bit_length() // 8 + 1, "little", signed=True))


def _ref_extra(k: Any) -> bytes:
    if k is None:
        return b"\x00"
    if isinstance(k, tuple):
        return b"\x04" + struct.pack("<Q", len(k)) + b"".join(_ref_scalar(x) for x in k)
    return _ref_scalar(k)


def reference_hashes(
    tokens: list[int],
    block_size: int,
    algorithm: str = "sha256",
    namespace: str = "default",
    salt: str | bytes | None = None,
    extra_keys: list[Any] | None = None,
    parent: bytes | None = None,
) -> list[bytes]:
    def h(data: bytes) -> bytes:
        return hashlib.sha256(data).digest() if algorithm == "sha256" else xxhash.xxh3_128_digest(data)

    if parent is None:
        salt_bytes = salt.encode("utf-8") if isinstance(salt, str) else salt
        salt_enc = b"\x00" if salt_bytes is None else b"\x01" + _lp(salt_bytes)
        parent = h(b"tiered_kv.seqhash.v1\0" + _lp(algorithm.encode()) + _lp(namespace.encode("utf-8")) + salt_enc)
    out = []
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        extra = _ref_extra(extra_keys[i] if extra_keys is not None else None)
        parent = h(parent + extra + b"".join(struct.pack("<I", t) for t in block))
        out.append(parent)
    return out


# ---------------------------------------------------------------------------------------------------------------
# strategies

token_st = st.integers(min_value=0, max_value=2**32 - 1)
small_token_st = st.integers(min_value=0, max_value=7)  # collisions between sequences are then likely
scalar_key_st = st.one_of(st.binary(max_size=8), st.text(max_size=8), st.integers(min_value=-(2**70), max_value=2**70))
extra_key_st = st.one_of(st.none(), scalar_key_st, st.tuples(scalar_key_st), st.lists(scalar_key_st).map(tuple))
salt_st = st.one_of(st.none(), st.binary(max_size=8), st.text(max_size=8))


@st.composite
def hash_inputs(draw: st.DrawFn) -> dict[str, Any]:
    block_size = draw(st.integers(min_value=1, max_value=8))
    tokens = draw(st.lists(token_st, max_size=40))
    n_full = len(tokens) // block_size
    kwargs: dict[str, Any] = {
        "algorithm": draw(st.sampled_from(ALGORITHMS)),
        "namespace": draw(st.text(max_size=8)),
        "salt": draw(salt_st),
    }
    if draw(st.booleans()):
        kwargs["extra_keys"] = draw(st.lists(extra_key_st, min_size=n_full, max_size=n_full))
    return {"tokens": tokens, "block_size": block_size, "kwargs": kwargs}


# ---------------------------------------------------------------------------------------------------------------
# format and basic shape


@given(hash_inputs())
@settings(max_examples=300, deadline=None)
def test_matches_reference_transcription_of_documented_format(case: dict[str, Any]) -> None:
    got = compute_sequence_hashes(case["tokens"], case["block_size"], **case["kwargs"])
    assert got == reference_hashes(case["tokens"], case["block_size"], **case["kwargs"])


def test_known_answer_vectors() -> None:
    # Pinned: these are on-disk keys. If this test fails, existing disk tiers stop matching.
    tokens = list(range(40))
    got = {alg: [h.hex() for h in compute_sequence_hashes(tokens, 16, algorithm=alg)] for alg in ALGORITHMS}
    assert got == KNOWN_ANSWERS


KNOWN_ANSWERS = {
    "sha256": [
        "b24f6f9c9ead4197c5ca4ff527cbe1c0feac61e9c2e2345357559211671ff948",
        "8276e595d94eeedd76b42c1aaec3b2864d22a60103f1fd1180d42c657ea64f5a",
    ],
    "xxh3_128": [
        "6244efd4473fb98b1e9fdecc4da3e465",
        "e49acf303636b36232c1ada051c3e2c8",
    ],
}


@pytest.mark.parametrize(("algorithm", "size"), [("sha256", 32), ("xxh3_128", 16)])
def test_hash_lengths(algorithm: str, size: int) -> None:
    assert hash_length(algorithm) == size
    hashes = compute_sequence_hashes(list(range(64)), 16, algorithm=algorithm)
    assert len(hashes) == 4
    assert all(type(h) is SequenceHash and len(h) == size for h in hashes)
    assert len(set(hashes)) == 4


def test_algorithms_agree_with_config() -> None:
    from tiered_kv.config import HASH_ALGORITHMS

    assert set(HASH_ALGORITHMS) == set(ALGORITHMS)
    for alg in HASH_ALGORITHMS:
        assert hash_length(alg) in (16, 32)


@pytest.mark.parametrize(("n_tokens", "expected"), [(0, 0), (1, 0), (15, 0), (16, 1), (17, 1), (31, 1), (32, 2)])
def test_one_hash_per_full_block_partial_block_gets_none(n_tokens: int, expected: int) -> None:
    tokens = list(range(n_tokens))
    hashes = compute_sequence_hashes(tokens, 16)
    assert len(hashes) == expected
    # the trailing partial block does not influence the full blocks' hashes
    assert hashes == compute_sequence_hashes(tokens[: expected * 16], 16)


def test_block_size_one_and_large_block() -> None:
    assert len(compute_sequence_hashes([1, 2, 3], 1)) == 3
    assert compute_sequence_hashes(list(range(100)), 1000) == []


# ---------------------------------------------------------------------------------------------------------------
# chaining


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_changing_block_zero_changes_every_hash(algorithm: str) -> None:
    tokens = list(range(16 * 6))
    base = compute_sequence_hashes(tokens, 16, algorithm=algorithm)
    tokens[3] += 1
    changed = compute_sequence_hashes(tokens, 16, algorithm=algorithm)
    assert all(a != b for a, b in zip(base, changed, strict=True))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_changing_block_three_keeps_earlier_hashes(algorithm: str) -> None:
    tokens = list(range(16 * 6))
    base = compute_sequence_hashes(tokens, 16, algorithm=algorithm)
    tokens[3 * 16 + 5] = 99999
    changed = compute_sequence_hashes(tokens, 16, algorithm=algorithm)
    assert changed[:3] == base[:3]
    assert all(a != b for a, b in zip(base[3:], changed[3:], strict=True))


@given(
    st.lists(token_st, min_size=1, max_size=64),
    st.integers(min_value=1, max_value=8),
    st.data(),
)
@settings(max_examples=200, deadline=None)
def test_hash_i_depends_on_exactly_blocks_up_to_i(tokens: list[int], block_size: int, data: st.DataObject) -> None:
    j = data.draw(st.integers(min_value=0, max_value=len(tokens) - 1))
    new = data.draw(token_st.filter(lambda t: t != tokens[j]))
    changed_tokens = [*tokens[:j], new, *tokens[j + 1 :]]
    base = compute_sequence_hashes(tokens, block_size, algorithm="xxh3_128")
    changed = compute_sequence_hashes(changed_tokens, block_size, algorithm="xxh3_128")
    block = j // block_size
    assert changed[:block] == base[:block]
    assert all(a != b for a, b in zip(base[block:], changed[block:], strict=True))


@given(hash_inputs(), st.data())
@settings(max_examples=200, deadline=None)
def test_parent_continuation_equals_hashing_the_whole_sequence(case: dict[str, Any], data: st.DataObject) -> None:
    tokens, bs, kwargs = case["tokens"], case["block_size"], case["kwargs"]
    full = compute_sequence_hashes(tokens, bs, **kwargs)
    k = data.draw(st.integers(min_value=1, max_value=max(1, len(full))))
    if k > len(full):
        return
    tail_kwargs = dict(kwargs)
    if "extra_keys" in kwargs:
        tail_kwargs["extra_keys"] = kwargs["extra_keys"][k:]
    # namespace/salt are ignored once a parent is given: the parent already covers them
    tail_kwargs["namespace"] = "ignored"
    tail = compute_sequence_hashes(tokens[k * bs :], bs, parent=full[k - 1], **tail_kwargs)
    assert tail == full[k:]


def test_parent_accepts_bytes_like() -> None:
    full = compute_sequence_hashes(list(range(64)), 16)
    for parent in (full[0], bytearray(full[0]), memoryview(full[0])):
        assert compute_sequence_hashes(list(range(16, 64)), 16, parent=parent) == full[1:]


# ---------------------------------------------------------------------------------------------------------------
# input forms


def _token_forms(tokens: list[int]) -> dict[str, Any]:
    forms: dict[str, Any] = {
        "list": tokens,
        "tuple": tuple(tokens),
        "np.int64": np.array(tokens, dtype=np.int64),
        "np.uint32": np.array(tokens, dtype=np.uint32),
        "np.uint64": np.array(tokens, dtype=np.uint64),
        "np.big-endian>u4": np.array(tokens, dtype=">u4"),
        "np.big-endian>i8": np.array(tokens, dtype=">i8"),
        "np.strided": np.repeat(np.array(tokens, dtype=np.int64), 2)[::2],
        "list of np.int64": [np.int64(t) for t in tokens],
        "torch.int64": torch.tensor(tokens, dtype=torch.int64),
    }
    if max(tokens, default=0) < 2**31:
        forms["np.int32"] = np.array(tokens, dtype=np.int32)
        forms["torch.int32"] = torch.tensor(tokens, dtype=torch.int32)
        forms["torch.strided"] = torch.tensor(tokens, dtype=torch.int32).repeat_interleave(2)[::2]
    if max(tokens, default=0) < 2**16:
        forms["np.uint16"] = np.array(tokens, dtype=np.uint16)
        forms["torch.uint16"] = torch.tensor(tokens, dtype=torch.int32).to(torch.uint16)
    if max(tokens, default=0) < 2**15:
        forms["torch.int16"] = torch.tensor(tokens, dtype=torch.int16)
    if max(tokens, default=0) < 2**8:
        forms["np.uint8"] = np.array(tokens, dtype=np.uint8)
        forms["torch.uint8"] = torch.tensor(tokens, dtype=torch.uint8)
    return forms


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "tokens",
    [list(range(100)), [0, 1] * 40, [2**32 - 1, 0, 2**31, 7] * 12, list(range(60000, 60100)), []],
    ids=["small", "zeros-and-ones", "extremes", "mid", "empty"],
)
def test_all_input_forms_give_identical_hashes(tokens: list[int], algorithm: str) -> None:
    expected = compute_sequence_hashes(tokens, 8, algorithm=algorithm)
    assert expected == reference_hashes(tokens, 8, algorithm=algorithm)
    for name, form in _token_forms(tokens).items():
        assert compute_sequence_hashes(form, 8, algorithm=algorithm) == expected, name


@given(st.lists(token_st, max_size=50), st.integers(min_value=1, max_value=6))
@settings(max_examples=100, deadline=None)
def test_input_forms_property(tokens: list[int], block_size: int) -> None:
    expected = compute_sequence_hashes(tokens, block_size, algorithm="xxh3_128")
    for name, form in _token_forms(tokens).items():
        assert compute_sequence_hashes(form, block_size, algorithm="xxh3_128") == expected, name


def test_input_is_not_modified() -> None:
    tokens = list(range(48))
    arr = np.arange(48, dtype=np.int64)
    ten = torch.arange(48)
    compute_sequence_hashes(tokens, 16)
    compute_sequence_hashes(arr, 16)
    compute_sequence_hashes(ten, 16)
    assert tokens == list(range(48))
    assert arr.tolist() == tokens
    assert ten.tolist() == tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensor_gives_same_hashes() -> None:
    tokens = list(range(1000, 1100))
    assert compute_sequence_hashes(torch.tensor(tokens, device="cuda"), 16) == compute_sequence_hashes(tokens, 16)


# ---------------------------------------------------------------------------------------------------------------
# namespace, salt, extra keys


def test_namespace_salt_and_extra_keys_change_every_hash() -> None:
    tokens = list(range(64))
    base = compute_sequence_hashes(tokens, 16)
    variants = [
        compute_sequence_hashes(tokens, 16, namespace="other-model"),
        compute_sequence_hashes(tokens, 16, namespace=""),
        compute_sequence_hashes(tokens, 16, salt="tenant-a"),
        compute_sequence_hashes(tokens, 16, salt=b""),
        compute_sequence_hashes(tokens, 16, algorithm="xxh3_128"),
    ]
    for v in variants:
        assert all(a != b for a, b in zip(base, v, strict=True))
    with_extra = compute_sequence_hashes(tokens, 16, extra_keys=[None, "img0", None, None])
    assert with_extra[0] == base[0]
    assert all(a != b for a, b in zip(base[1:], with_extra[1:], strict=True))


def test_salt_none_differs_from_empty_and_str_equals_utf8_bytes() -> None:
    tokens = list(range(32))
    assert compute_sequence_hashes(tokens, 16, salt=None) != compute_sequence_hashes(tokens, 16, salt=b"")
    assert compute_sequence_hashes(tokens, 16, salt="") == compute_sequence_hashes(tokens, 16, salt=b"")
    assert compute_sequence_hashes(tokens, 16, salt="ключ") == compute_sequence_hashes(tokens, 16, salt="ключ".encode())
    assert compute_sequence_hashes(tokens, 16, salt="a") != compute_sequence_hashes(tokens, 16, salt="b")


def test_namespace_and_salt_boundaries_are_unambiguous() -> None:
    tokens = list(range(16))
    a = compute_sequence_hashes(tokens, 16, namespace="ab", salt="c")
    b = compute_sequence_hashes(tokens, 16, namespace="a", salt="bc")
    assert a != b


def test_extra_keys_none_equals_all_none_entries() -> None:
    tokens = list(range(50))
    assert compute_sequence_hashes(tokens, 16) == compute_sequence_hashes(tokens, 16, extra_keys=[None] * 3)
    assert compute_sequence_hashes(tokens, 16, extra_keys=(None, None, None)) == compute_sequence_hashes(tokens, 16)


def test_extra_keys_are_type_tagged_and_unambiguous() -> None:
    tokens = list(range(16))
    keys: list[Any] = [
        "1",
        b"1",
        1,
        -1,
        0,
        255,
        256,
        -256,
        2**64,
        -(2**64),
        "",
        b"",
        (),
        ("a", "b"),
        ("ab",),
        ("a", b"b"),
        "ab",
        (1,),
        (1, 2),
        ((b"\x01" + struct.pack("<Q", 1) + b"x"),),
    ]
    hashes = [compute_sequence_hashes(tokens, 16, extra_keys=[k])[0] for k in keys]
    assert len(set(hashes)) == len(keys)
    # numpy integers are ints
    assert compute_sequence_hashes(tokens, 16, extra_keys=[np.int64(5)]) == compute_sequence_hashes(
        tokens, 16, extra_keys=[5]
    )


@given(st.lists(extra_key_st, min_size=2, max_size=2, unique_by=_ref_extra))
@settings(max_examples=200, deadline=None)
def test_distinct_extra_keys_give_distinct_hashes(keys: list[Any]) -> None:
    tokens = [1, 2, 3]
    a = compute_sequence_hashes(tokens, 3, extra_keys=[keys[0]], algorithm="xxh3_128")
    b = compute_sequence_hashes(tokens, 3, extra_keys=[keys[1]], algorithm="xxh3_128")
    assert a != b


def test_block_size_is_not_ambiguous_with_extra_keys() -> None:
    # a 2-token block whose extra key could mimic tokens must not collide with a 3-token block
    a = compute_sequence_hashes([1, 2, 3], 3)
    b = compute_sequence_hashes([2, 3], 2, extra_keys=[None])
    assert a != b


# ---------------------------------------------------------------------------------------------------------------
# determinism across processes

_CHILD = r"""
import json, sys
from tiered_kv.hashing import compute_sequence_hashes
out = {}
for alg in ("sha256", "xxh3_128"):
    out[alg] = [h.hex() for h in compute_sequence_hashes(
        list(range(100)), 16, algorithm=alg, namespace="model/rev", salt="tenant",
        extra_keys=[None, "img", b"raw", 42, ("lora", 7), None])]
print(json.dumps(out))
"""


def _hashes_in_process() -> dict[str, list[str]]:
    out = {}
    for alg in ALGORITHMS:
        out[alg] = [
            h.hex()
            for h in compute_sequence_hashes(
                list(range(100)),
                16,
                algorithm=alg,
                namespace="model/rev",
                salt="tenant",
                extra_keys=[None, "img", b"raw", 42, ("lora", 7), None],
            )
        ]
    return out


@pytest.mark.parametrize("seed", ["0", "12345", "random"])
def test_same_hashes_in_another_process_with_another_hash_seed(seed: str) -> None:
    env = dict(os.environ, PYTHONHASHSEED=seed)
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == _hashes_in_process()


# ---------------------------------------------------------------------------------------------------------------
# bad input: every case raises ValueError naming the argument

BAD_CASES: list[tuple[str, dict[str, Any], str]] = [
    # token_ids
    ("negative", {"token_ids": [1, 2, 3, 4, 5, -1]}, r"^token_ids\[5\]: -1 is out of range \[0, 2\*\*32\)$"),
    ("tuple negative", {"token_ids": (0, 0, -7)}, r"^token_ids\[2\]: -7 is out of range \[0, 2\*\*32\)$"),
    ("list subclass float", {"token_ids": type("L", (list,), {})([0, 2.5])}, r"^token_ids\[1\]: .* got float"),
    ("too big", {"token_ids": [0, 2**32]}, r"^token_ids\[1\]: 4294967296 is out of range"),
    ("huge", {"token_ids": [0, 0, 10**30]}, r"^token_ids\[2\]: .* is out of range"),
    ("float", {"token_ids": [0, 1.0]}, r"^token_ids\[1\]: expected an int token id, got float"),
    ("str element", {"token_ids": [0, "1"]}, r"^token_ids\[1\]: expected an int token id, got str"),
    ("None element", {"token_ids": [None]}, r"^token_ids\[0\]: expected an int token id, got NoneType"),
    ("bool True", {"token_ids": [5, 6, True, 7]}, r"^token_ids\[2\]: expected an int token id, got bool"),
    ("bool False", {"token_ids": (0, False)}, r"^token_ids\[1\]: expected an int token id, got bool"),
    ("many zeros then bool", {"token_ids": [0] * 1000 + [True]}, r"^token_ids\[1000\]: .*got bool"),
    ("np.bool_ element", {"token_ids": [1, np.True_]}, r"^token_ids\[1\]: .*got bool"),
    ("str", {"token_ids": "abc"}, r"^token_ids: expected a list/tuple of ints .* got str"),
    ("bytes", {"token_ids": b"abc"}, r"^token_ids: expected .* got bytes"),
    ("generator", {"token_ids": (i for i in range(3))}, r"^token_ids: expected .* got generator"),
    ("range", {"token_ids": range(3)}, r"^token_ids: expected .* got range"),
    ("None", {"token_ids": None}, r"^token_ids: expected .* got NoneType"),
    ("2-D numpy", {"token_ids": np.zeros((2, 3), dtype=np.int64)}, r"^token_ids: expected a 1-D array, got shape"),
    ("0-D numpy", {"token_ids": np.int64(3)}, r"^token_ids: expected"),
    (
        "float numpy",
        {"token_ids": np.zeros(3, dtype=np.float32)},
        r"^token_ids: expected an integer dtype, got float32",
    ),
    ("bool numpy", {"token_ids": np.zeros(3, dtype=bool)}, r"^token_ids: expected an integer dtype, got bool"),
    ("object numpy", {"token_ids": np.array([1, 2], dtype=object)}, r"^token_ids: expected an integer dtype"),
    ("negative numpy", {"token_ids": np.array([0, 1, 2, -4])}, r"^token_ids\[3\]: -4 is out of range"),
    ("big uint64 numpy", {"token_ids": np.array([2**40], dtype=np.uint64)}, r"^token_ids\[0\]: 1099511627776 is out"),
    ("float torch", {"token_ids": torch.zeros(3)}, r"^token_ids: expected an integer dtype, got torch.float32"),
    ("bool torch", {"token_ids": torch.zeros(3, dtype=torch.bool)}, r"^token_ids: expected an integer dtype"),
    ("2-D torch", {"token_ids": torch.zeros(2, 2, dtype=torch.int64)}, r"^token_ids: expected a 1-D tensor"),
    ("negative torch", {"token_ids": torch.tensor([3, -2])}, r"^token_ids\[1\]: -2 is out of range"),
    ("too big torch", {"token_ids": torch.tensor([2**32 + 5])}, r"^token_ids\[0\]: 4294967301 is out of range"),
    # block_size
    ("block_size 0", {"block_size": 0}, r"^block_size must be a positive int, got 0$"),
    ("block_size -1", {"block_size": -1}, r"^block_size must be a positive int, got -1$"),
    ("block_size bool", {"block_size": True}, r"^block_size must be a positive int, got True$"),
    ("block_size float", {"block_size": 16.0}, r"^block_size must be a positive int, got 16.0$"),
    ("block_size str", {"block_size": "16"}, r"^block_size must be a positive int"),
    # algorithm, namespace, salt, parent
    ("algorithm", {"algorithm": "md5"}, r"^algorithm: unknown hash algorithm 'md5'"),
    ("algorithm None", {"algorithm": None}, r"^algorithm: unknown hash algorithm None"),
    ("algorithm list", {"algorithm": ["sha256"]}, r"^algorithm: unknown hash algorithm"),
    ("namespace int", {"namespace": 3}, r"^namespace must be a str, got int$"),
    ("namespace bytes", {"namespace": b"x"}, r"^namespace must be a str, got bytes$"),
    ("namespace surrogate", {"namespace": "\ud800"}, r"^namespace: not encodable as UTF-8"),
    ("salt int", {"salt": 5}, r"^salt must be None, str or bytes, got int$"),
    ("salt bytearray", {"salt": bytearray(b"x")}, r"^salt must be None, str or bytes, got bytearray$"),
    ("salt surrogate", {"salt": "\udcff"}, r"^salt: not encodable as UTF-8"),
    ("parent short", {"parent": b"x" * 16}, r"^parent: expected 32 bytes for sha256, got 16$"),
    ("parent str", {"parent": "x" * 32}, r"^parent: expected None or a 32-byte sha256 hash, got str$"),
    # extra_keys
    ("extra count", {"token_ids": list(range(64)), "extra_keys": [None] * 3}, r"^extra_keys: expected 4 entries \(one"),
    ("extra for partial", {"token_ids": list(range(20)), "extra_keys": [None] * 2}, r"^extra_keys: expected 1 entr"),
    ("extra str", {"extra_keys": "ab"}, r"^extra_keys: expected a list or tuple, got str$"),
    ("extra dict", {"extra_keys": {0: None}}, r"^extra_keys: expected a list or tuple, got dict$"),
    ("extra float", {"extra_keys": [None, 1.5]}, r"^extra_keys\[1\]: expected None, str, bytes, int or a tuple"),
    ("extra bool", {"extra_keys": [True, None]}, r"^extra_keys\[0\]: expected .* got bool$"),
    ("extra list", {"extra_keys": [["a"], None]}, r"^extra_keys\[0\]: expected .* got list$"),
    ("extra nested", {"extra_keys": [None, ("a", ("b",))]}, r"^extra_keys\[1\]\[1\]: expected str, bytes or int"),
    ("extra None in tuple", {"extra_keys": [(None,), None]}, r"^extra_keys\[0\]\[0\]: expected str, bytes or int"),
    ("extra bool in tuple", {"extra_keys": [(1, False), None]}, r"^extra_keys\[0\]\[1\]: .* got bool$"),
    ("extra surrogate", {"extra_keys": ["\ud800", None]}, r"^extra_keys\[0\]: not encodable as UTF-8"),
]


@pytest.mark.parametrize(("overrides", "pattern"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_input_raises_value_error_naming_the_argument(overrides: dict[str, Any], pattern: str) -> None:
    args: dict[str, Any] = {"token_ids": list(range(32)), "block_size": 16}
    args.update(overrides)
    token_ids, block_size = args.pop("token_ids"), args.pop("block_size")
    with pytest.raises(ValueError, match=pattern):
        compute_sequence_hashes(token_ids, block_size, **args)


def test_bad_token_is_reported_even_in_partial_block() -> None:
    with pytest.raises(ValueError, match=r"^token_ids\[17\]: -3 is out of range"):
        compute_sequence_hashes([0] * 17 + [-3], 16)


# ---------------------------------------------------------------------------------------------------------------
# compute_prefix_match


def _chain(tokens: list[int]) -> list[bytes]:
    return compute_sequence_hashes(tokens, 2, algorithm="xxh3_128")


@given(st.lists(small_token_st, max_size=30), st.lists(small_token_st, max_size=30), st.lists(small_token_st))
@settings(max_examples=300, deadline=None)
def test_prefix_match_sequence_mode_is_common_prefix(prefix: list[int], a: list[int], b: list[int]) -> None:
    cached, request = _chain(prefix + a), _chain(prefix + b)
    expected = 0
    while expected < min(len(cached), len(request)) and cached[expected] == request[expected]:
        expected += 1
    assert compute_prefix_match(cached, request) == expected
    assert compute_prefix_match(tuple(cached), tuple(request)) == expected
    assert compute_prefix_match(request, cached) == expected
    # chained hashes: the set view agrees with the sequence view
    assert compute_prefix_match(set(cached), request) == expected


@given(
    st.sets(st.binary(min_size=1, max_size=2)),
    st.lists(st.binary(min_size=1, max_size=2), max_size=20),
)
@settings(max_examples=300, deadline=None)
def test_prefix_match_set_mode_counts_leading_present(cached: set[bytes], request: list[bytes]) -> None:
    expected = 0
    for h in request:
        if h not in cached:
            break
        expected += 1
    assert compute_prefix_match(cached, request) == expected
    assert compute_prefix_match(frozenset(cached), request) == expected
    as_dict = dict.fromkeys(cached, "block")
    assert compute_prefix_match(as_dict, request) == expected
    assert compute_prefix_match(as_dict.keys(), request) == expected


def test_prefix_match_set_mode_stops_at_first_miss() -> None:
    h = _chain(list(range(20)))
    assert compute_prefix_match({h[0], h[1], h[3]}, h) == 2
    assert compute_prefix_match(set(), h) == 0
    assert compute_prefix_match(set(h), []) == 0
    assert compute_prefix_match(set(h), h) == len(h)


def test_prefix_match_sequence_edge_cases() -> None:
    h = _chain(list(range(20)))
    assert compute_prefix_match([], h) == 0
    assert compute_prefix_match(h, []) == 0
    assert compute_prefix_match(h, h) == len(h)
    assert compute_prefix_match(h[:4], h) == 4
    assert compute_prefix_match(h, h[:4]) == 4


@pytest.mark.parametrize(
    ("cached", "request_", "pattern"),
    [
        (iter([]), [], r"^cached_hashes: expected a Set, Mapping or Sequence"),
        (b"abc", [], r"^cached_hashes: expected .* got bytes"),
        ("abc", [], r"^cached_hashes: expected .* got str"),
        (None, [], r"^cached_hashes: expected"),
        (set(), b"abc", r"^request_hashes: expected a list or tuple, got bytes"),
        (set(), iter([]), r"^request_hashes: expected a list or tuple"),
    ],
)
def test_prefix_match_bad_types(cached: Any, request_: Any, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        compute_prefix_match(cached, request_)


# ---------------------------------------------------------------------------------------------------------------
# compute_cache_keys


def test_cache_keys_match_per_request_hashes() -> None:
    reqs = ["a", "b", 3]
    toks: list[Any] = [list(range(40)), np.arange(100, 164), torch.arange(5)]
    keys = compute_cache_keys(reqs, toks, 16, algorithm="xxh3_128", namespace="m", salt="s")
    assert list(keys) == reqs
    for r, t in zip(reqs, toks, strict=True):
        assert keys[r] == compute_sequence_hashes(t, 16, algorithm="xxh3_128", namespace="m", salt="s")
    assert [len(v) for v in keys.values()] == [2, 4, 0]
    assert all(len(h) == 16 for v in keys.values() for h in v)


def test_cache_keys_defaults_and_empty() -> None:
    assert compute_cache_keys([], [], 16) == {}
    keys = compute_cache_keys(("r",), (list(range(16)),), 16)
    assert keys == {"r": compute_sequence_hashes(list(range(16)), 16)}


def test_cache_keys_extra_keys_list() -> None:
    toks = [list(range(32)), list(range(16))]
    keys = compute_cache_keys(["x", "y"], toks, 16, extra_keys_list=[["img", None], None])
    assert keys["x"] == compute_sequence_hashes(toks[0], 16, extra_keys=["img", None])
    assert keys["y"] == compute_sequence_hashes(toks[1], 16)


@given(st.lists(st.lists(small_token_st, max_size=20), max_size=5), st.sampled_from(ALGORITHMS))
@settings(max_examples=50, deadline=None)
def test_cache_keys_property(token_lists: list[list[int]], algorithm: str) -> None:
    ids = [f"req{i}" for i in range(len(token_lists))]
    keys = compute_cache_keys(ids, token_lists, 3, algorithm=algorithm)
    assert keys == {
        i: compute_sequence_hashes(t, 3, algorithm=algorithm) for i, t in zip(ids, token_lists, strict=True)
    }


@pytest.mark.parametrize(
    ("args", "kwargs", "pattern"),
    [
        ((["a", "b"], [[1]], 1), {}, r"^token_ids_list: expected 2 entries \(one per request id\), got 1$"),
        ((["a"], [[1], [2]], 1), {}, r"^token_ids_list: expected 1 entries"),
        ((["a", "a"], [[1], [2]], 1), {}, r"^request_ids\[1\]: duplicate request id 'a'$"),
        (([["unhashable"]], [[1]], 1), {}, r"^request_ids\[0\]: request id must be hashable, got list$"),
        (("ab", [[1], [2]], 1), {}, r"^request_ids: expected a list or tuple, got str$"),
        ((["a"], None, 1), {}, r"^token_ids_list: expected a list or tuple, got NoneType$"),
        ((["a", "b"], [[1], [2, -1]], 1), {}, r"^token_ids_list\[1\]\[1\]: -1 is out of range"),
        ((["a"], [[1]], 0), {}, r"^block_size must be a positive int"),
        ((["a"], [[1]], 1), {"algorithm": "md5"}, r"^algorithm: unknown"),
        ((["a"], [[1]], 1), {"salt": 1}, r"^salt must be"),
        ((["a"], [[1]], 1), {"extra_keys_list": [None, None]}, r"^extra_keys_list: expected 1 entries"),
        ((["a"], [[1, 2]], 1), {"extra_keys_list": [[None]]}, r"^extra_keys_list\[0\]: expected 2 entries"),
        ((["a"], [[1]], 1), {"extra_keys_list": [[1.5]]}, r"^extra_keys_list\[0\]\[0\]: expected None"),
    ],
)
def test_cache_keys_bad_input(args: tuple[Any, ...], kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        compute_cache_keys(*args, **kwargs)


def test_cache_keys_rejects_unknown_option() -> None:
    with pytest.raises(TypeError):
        compute_cache_keys(["a"], [[1]], 1, extra_keys=[None])  # type: ignore[call-arg]


# ---------------------------------------------------------------------------------------------------------------
# validate_hashes


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_validate_hashes_accepts_and_converts(algorithm: str) -> None:
    hashes = compute_sequence_hashes(list(range(64)), 16, algorithm=algorithm)
    out = validate_hashes(hashes, algorithm)
    assert out == hashes and out is not hashes
    assert validate_hashes(tuple(hashes), algorithm) == hashes
    mixed = [hashes[0], bytearray(hashes[1]), memoryview(hashes[2]), hashes[3]]
    out = validate_hashes(mixed, algorithm)
    assert out == hashes and all(isinstance(h, bytes) for h in out)
    assert type(out[1]) is bytes and type(out[2]) is bytes  # bytes-likes are converted
    assert out[3] is hashes[3] and out[3].parent == hashes[2]  # SequenceHash objects pass as they are, with parents
    assert validate_hashes([], algorithm) == []


@pytest.mark.parametrize(
    ("hashes", "argument", "pattern"),
    [
        ([b"x" * 32] * 3 + [b"x" * 16], "hashes", r"^hashes\[3\]: expected 32 bytes, got 16$"),
        ([b"x" * 32, "x" * 32], "hashes", r"^hashes\[1\]: expected 32 bytes, got str$"),
        ([7], "hashes", r"^hashes\[0\]: expected 32 bytes, got int$"),
        ([None], "hashes", r"^hashes\[0\]: expected 32 bytes, got NoneType$"),
        ([b""], "parent_hashes", r"^parent_hashes\[0\]: expected 32 bytes, got 0$"),
        (b"x" * 32, "hashes", r"^hashes: expected a list or tuple of 32-byte hashes, got bytes$"),
        ("abc", "hashes", r"^hashes: expected a list or tuple .* got str$"),
        ({b"x" * 32}, "seq", r"^seq: expected a list or tuple .* got set$"),
        (None, "hashes", r"^hashes: expected a list or tuple .* got NoneType$"),
    ],
)
def test_validate_hashes_rejects(hashes: Any, argument: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        validate_hashes(hashes, "sha256", argument=argument)


def test_validate_hashes_length_follows_algorithm() -> None:
    with pytest.raises(ValueError, match=r"^hashes\[0\]: expected 16 bytes, got 32$"):
        validate_hashes([b"x" * 32], "xxh3_128")
    with pytest.raises(ValueError, match=r"^algorithm: unknown hash algorithm"):
        validate_hashes([], "crc32")


# ---------------------------------------------------------------------------------------------------------------
# SequenceHash: parents


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_hash_knows_its_parent(algorithm: str) -> None:
    hashes = compute_sequence_hashes(list(range(80)), 16, algorithm=algorithm)
    assert [type(h) for h in hashes] == [SequenceHash] * 5
    assert hashes[0].parent is None
    assert [h.parent for h in hashes[1:]] == hashes[:-1]
    assert all(type(h.parent) is bytes for h in hashes[1:])
    # The parent is what the chain was computed from: continuing from it gives the same hash.
    for i in range(1, 5):
        assert compute_sequence_hashes(
            list(range(16 * i, 16 * (i + 1))), 16, algorithm=algorithm, parent=hashes[i].parent
        ) == [hashes[i]]


def test_equality_hashing_and_ordering_are_those_of_the_plain_bytes() -> None:
    hashes = compute_sequence_hashes(list(range(64)), 16)
    plain = [bytes(h) for h in hashes]
    assert all(type(p) is bytes for p in plain)
    assert hashes == plain and [hash(h) for h in hashes] == [hash(p) for p in plain]
    assert sorted(hashes) == sorted(plain) and hashes[1][:4] == plain[1][:4] and hashes[1].hex() == plain[1].hex()
    # Mixed in dicts and sets: one key per value, whichever object was stored.
    d = {p: i for i, p in enumerate(plain)}
    assert [d[h] for h in hashes] == [0, 1, 2, 3]
    assert len(set(hashes) | set(plain)) == 4
    assert hashes[2] in set(plain) and plain[2] in set(hashes)


def test_parent_is_read_only_and_the_bytes_immutable() -> None:
    h = compute_sequence_hashes(list(range(32)), 16)[1]
    with pytest.raises(AttributeError):
        h.parent = None  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del h.parent  # type: ignore[misc]
    with pytest.raises(TypeError):
        h[0] = 1  # type: ignore[index]
    assert h.parent is not None


def test_continuation_parent_and_cache_keys_parents() -> None:
    full = compute_sequence_hashes(list(range(64)), 16)
    tail = compute_sequence_hashes(list(range(16, 64)), 16, parent=full[0])
    assert tail[0].parent is full[0]  # the caller's own object, chain and all
    assert tail[0].parent.parent is None  # type: ignore[union-attr]
    assert [h.parent for h in tail[1:]] == tail[:-1]
    # A bytes-like parent is copied into plain bytes.
    tail = compute_sequence_hashes(list(range(16, 32)), 16, parent=bytearray(full[0]))
    assert type(tail[0].parent) is bytes and tail[0].parent == full[0]
    keys = compute_cache_keys(["a", "b"], [list(range(48)), list(range(16))], 16)
    assert keys["a"][0].parent is None and keys["b"][0].parent is None
    assert [h.parent for h in keys["a"][1:]] == keys["a"][:-1]


def test_plain_and_with_parent_construction() -> None:
    full = compute_sequence_hashes(list(range(32)), 16)
    root = SequenceHash(bytes(full[1]))
    assert root == full[1] and root.parent is None
    h = SequenceHash.with_parent(memoryview(bytes(full[1])), bytearray(full[0]))
    assert h == full[1] and type(h.parent) is bytes and h.parent == full[0]
    assert SequenceHash.with_parent(full[1], full[0]).parent is full[0]
    assert SequenceHash.with_parent(full[1], None).parent is None
    with pytest.raises(ValueError, match=r"^parent: expected None or bytes, got str$"):
        SequenceHash.with_parent(full[1], "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^value: expected bytes, got int$"):
        SequenceHash.with_parent(7, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_and_copying_keep_parents(protocol: int) -> None:
    hashes = compute_sequence_hashes(list(range(16 * 3000)), 16, algorithm="xxh3_128")
    back = pickle.loads(pickle.dumps(hashes, protocol=protocol))
    assert back == hashes and all(type(h) is SequenceHash for h in back)
    assert [h.parent for h in back] == [h.parent for h in hashes]
    # One hash of a long chain pickles alone (its parent as plain bytes: no recursion through the chain).
    last = pickle.loads(pickle.dumps(hashes[-1], protocol=protocol))
    assert last == hashes[-1] and last.parent == hashes[-2]
    root = pickle.loads(pickle.dumps(SequenceHash(b"r" * 16), protocol=protocol))
    assert root == b"r" * 16 and root.parent is None
    assert copy.copy(hashes[5]) is hashes[5] and copy.deepcopy(hashes)[5].parent == hashes[4]


def test_parent_is_not_part_of_the_hash() -> None:
    # The parent is not part of the hash: a chain's hashes are the plain digests, whoever computes them.
    a = compute_sequence_hashes(list(range(64)), 16, algorithm="xxh3_128")
    b = compute_sequence_hashes(list(range(64)), 16, algorithm="xxh3_128")
    assert a == b and a[1] is not b[1] and a[2].parent == b[1]


def test_a_kept_hash_does_not_keep_its_whole_chain_alive() -> None:
    # Hashes share their parents' storage in runs; keeping one hash of a long chain must keep about one run of
    # digests alive, not the chain (a pool may keep a few hashes of many long requests).
    tokens = np.arange(16 * 100_000, dtype=np.int64)
    gc.collect()
    tracemalloc.start()
    try:
        hashes = compute_sequence_hashes(tokens, 16, algorithm="xxh3_128")
        kept = hashes[50_000]
        whole, _ = tracemalloc.get_traced_memory()
        del hashes
        gc.collect()
        left, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept.parent is not None and len(kept.parent) == 16
    assert whole > 10_000_000 and left < 50_000, (whole, left)
