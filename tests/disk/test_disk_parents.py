"""Parents in the disk registry: rows record each block's parent, format version 1 tiers are read and migrated."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lmdb
import msgpack
import pytest
from disk_helpers import ALGO, MODEL, NAMESPACE, blocks_for, disk_config, same, seq_hash
from hypothesis import given, settings
from hypothesis import strategies as st

from tiered_kv.errors import DiskFullError, DiskTierError
from tiered_kv.hashing import SequenceHash, compute_sequence_hashes
from tiered_kv.storage.disk import DiskStore
from tiered_kv.storage.disk.store import FORMAT_VERSION, find_orphans


def _open(path: Path, num_blocks: int = 16, readonly: bool = False) -> DiskStore:
    return DiskStore(disk_config(path, num_blocks), MODEL, hash_algorithm=ALGO, namespace=NAMESPACE, readonly=readonly)


def _raw_registry(path: Path) -> tuple[dict[bytes, list], dict]:
    """Rows and meta record exactly as stored (an LMDB reader of its own; no DiskStore may be open here)."""
    env = lmdb.open(str(path / "registry"), readonly=True, max_dbs=2, lock=False)
    try:
        with env.begin() as txn:
            rows = {bytes(k): msgpack.unpackb(v) for k, v in txn.cursor(db=env.open_db(b"blocks", txn=txn))}
            meta = msgpack.unpackb(txn.get(b"meta", db=env.open_db(b"meta", txn=txn)))
    finally:
        env.close()
    return rows, meta


def _chain(n: int) -> list[SequenceHash]:
    return compute_sequence_hashes(
        list(range(n * MODEL.page_size)), MODEL.page_size, algorithm=ALGO, namespace=NAMESPACE
    )


# -- rows record parents ----------------------------------------------------------------------------------------
def test_parents_are_recorded_and_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "tier"
    chain = _chain(4)
    loose = [seq_hash("loose", i) for i in range(2)]
    with _open(path) as s:
        # Defaults: a SequenceHash brings its own parent, plain bytes are chain heads.
        s.write_blocks(chain[:2] + loose[:1], [0, 1, 2], blocks_for(chain[:2] + loose[:1], MODEL))
        # Explicit parents win over .parent; None makes a head; any bytes-like parent is accepted.
        s.write_blocks(
            [chain[2], chain[3], loose[1]],
            [3, 4, 5],
            blocks_for([chain[2], chain[3], loose[1]], MODEL),
            parents=[bytearray(chain[1]), None, loose[0]],
        )
        want = {
            chain[0]: None,
            chain[1]: chain[0],
            loose[0]: None,
            chain[2]: chain[1],
            chain[3]: None,
            loose[1]: loose[0],
        }
        assert {e.hash: e.parent for e in s.entries()} == want
        assert {h: p for h, _, _, p in s.slot_order()} == want
        assert s.lookup(chain[1]).parent == chain[0]  # type: ignore[union-attr]
    rows, meta = _raw_registry(path)
    assert meta["format_version"] == FORMAT_VERSION == 2
    assert all(len(r) == 8 and r[7] == want[k] for k, r in rows.items())
    assert all(type(r[7]) is bytes for r in rows.values() if r[7] is not None)
    for readonly in (False, True):
        with _open(path, readonly=readonly) as s:
            assert {e.hash: e.parent for e in s.entries()} == want


def test_tokens_and_parent_together(tmp_path: Path) -> None:
    chain = _chain(3)
    toks = [bytes(range(4 * MODEL.page_size)), None, b"\x01" * 4 * MODEL.page_size]
    with _open(tmp_path / "t") as s:
        s.write_blocks(chain, [0, 1, 2], blocks_for(chain, MODEL), tokens=toks)
        assert [(e.tokens, e.parent) for e in sorted(s.entries(), key=lambda e: e.slot)] == [
            (toks[0], None),
            (None, chain[0]),
            (toks[2], chain[1]),
        ]


@pytest.mark.parametrize(
    ("parents", "pattern"),
    [
        ([None], r"2 hashes but 1 parents"),
        ([None, b"x" * 16], r"sha256 parent \(a sequence hash or None\): expected 32 bytes, got 16"),
        ([None, "ab" * 16], r"sha256 parent \(a sequence hash or None\): expected 32 bytes, got str"),
        ([None, "self"], r"cannot be its own parent"),
    ],
)
def test_bad_parents_are_refused_before_anything_is_written(tmp_path: Path, parents: list, pattern: str) -> None:
    hashes = [seq_hash("bad", 0), seq_hash("bad", 1)]
    parents = [hashes[1] if p == "self" else p for p in parents]
    with _open(tmp_path / "t") as s:
        with pytest.raises(DiskTierError, match=pattern):
            s.write_blocks(hashes, [0, 1], blocks_for(hashes, MODEL), parents=parents)
        assert s.entries() == []
        s.write_blocks(hashes, [0, 1], blocks_for(hashes, MODEL))  # the slots are still free
        assert len(s) == 2


# -- format version 1 -------------------------------------------------------------------------------------------
def _make_v1_tier(path: Path, hashes: Sequence[bytes], tokens: Sequence[bytes | None]) -> None:
    """A tier as format version 1 left it: rows of 6 fields (7 with token ids), meta format_version 1.

    The data files are written by today's code (their layout did not change); the registry is then rewritten the
    old way through LMDB directly.
    """
    with _open(path) as s:
        s.write_blocks(list(hashes), list(range(len(hashes))), blocks_for(hashes, MODEL), tokens=tokens)
    env = lmdb.open(str(path / "registry"), max_dbs=2)
    try:
        blocks, meta_db = env.open_db(b"blocks"), env.open_db(b"meta")
        with env.begin(write=True) as txn:
            for key, raw in list(txn.cursor(db=blocks)):
                row = msgpack.unpackb(raw)
                txn.put(key, msgpack.packb(row[:6] if row[6] is None else row[:7]), db=blocks)
            meta = msgpack.unpackb(txn.get(b"meta", db=meta_db))
            txn.put(b"meta", msgpack.packb({**meta, "format_version": 1}), db=meta_db)
    finally:
        env.close()
    rows, meta = _raw_registry(path)
    assert meta["format_version"] == 1 and sorted(map(len, rows.values())) == [6] * (len(hashes) - 1) + [7]


@pytest.fixture
def v1_tier(tmp_path: Path) -> tuple[Path, list[bytes], list[bytes | None]]:
    path = tmp_path / "v1"
    hashes = [seq_hash("v1", i) for i in range(5)]
    tokens: list[bytes | None] = [None, None, bytes(4 * MODEL.page_size), None, None]
    _make_v1_tier(path, hashes, tokens)
    return path, hashes, tokens


def test_readonly_opener_reads_a_v1_tier_and_changes_nothing(
    v1_tier: tuple[Path, list[bytes], list[bytes | None]],
) -> None:
    path, hashes, tokens = v1_tier
    before = _raw_registry(path)
    with _open(path, readonly=True) as ro:
        assert ro.stats()["format_version"] == 1
        by_hash = {e.hash: e for e in ro.entries()}
        assert [(by_hash[h].tokens, by_hash[h].parent) for h in hashes] == [(t, None) for t in tokens]
        assert [(t, p) for _, _, t, p in sorted(ro.slot_order(), key=lambda x: x[1])] == [(t, None) for t in tokens]
        assert ro.lookup(hashes[2]).tokens == tokens[2]  # type: ignore[union-attr]
        out, bad = ro.read_blocks(list(range(5)))
        assert bad == [] and same(out, blocks_for(hashes, MODEL))
        assert ro.verify() == [] and ro.orphans() == []
    assert _raw_registry(path) == before


def test_writer_migrates_a_v1_tier_in_one_transaction(v1_tier: tuple[Path, list[bytes], list[bytes | None]]) -> None:
    path, hashes, tokens = v1_tier
    with _open(path) as s:
        assert s.stats()["format_version"] == FORMAT_VERSION
        assert [(e.hash, e.tokens, e.parent) for e in sorted(s.entries(), key=lambda e: e.slot)] == [
            (h, t, None) for h, t in zip(hashes, tokens, strict=True)
        ]
        out, bad = s.read_blocks(list(range(5)))
        assert bad == [] and same(out, blocks_for(hashes, MODEL))
        # Writes after the migration record parents as usual.
        more = _chain(2)
        s.write_blocks(more, [5, 6], blocks_for(more, MODEL))
    rows, meta = _raw_registry(path)
    assert meta["format_version"] == FORMAT_VERSION
    assert all(len(r) == 8 for r in rows.values())
    assert [rows[h][6:] for h in hashes] == [[t, None] for t in tokens]
    assert rows[more[1]][7] == more[0]
    with _open(path, readonly=True) as ro:  # and it opens again, as version 2
        assert len(ro.entries()) == 7 and ro.stats()["format_version"] == FORMAT_VERSION


def test_failed_migration_leaves_the_v1_tier_untouched(
    v1_tier: tuple[Path, list[bytes], list[bytes | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, hashes, _ = v1_tier
    before = _raw_registry(path)
    real_packb = msgpack.packb
    calls = [0]

    def packb_then_fail(obj: object, **kw: object) -> bytes:
        # The migration transaction packs every row, then the meta record: fail in the middle of the rows,
        # as a full map would.
        calls[0] += 1
        if calls[0] == 3:
            raise lmdb.MapFullError("injected: map full")
        return real_packb(obj, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(msgpack, "packb", packb_then_fail)
    with pytest.raises(DiskFullError, match=r"cannot migrate it from format version 1 to 2 .* it is unchanged"):
        _open(path)
    monkeypatch.undo()
    assert calls[0] == 3
    assert _raw_registry(path) == before  # nothing of the transaction was committed
    with _open(path) as s:  # and the next open migrates it
        assert len(s.entries()) == len(hashes)
    assert _raw_registry(path)[1]["format_version"] == FORMAT_VERSION


# -- orphans ----------------------------------------------------------------------------------------------------
def _reachable_model(parents: dict[bytes, bytes | None]) -> set[bytes]:
    """Independent model: grow the reachable set from the chain heads until nothing changes."""
    reachable = {k for k, p in parents.items() if p is None}
    grew = True
    while grew:
        new = {k for k, p in parents.items() if k not in reachable and p in reachable}
        reachable |= new
        grew = bool(new)
    return reachable


@given(
    st.lists(st.integers(min_value=-1, max_value=30), min_size=0, max_size=30),
    st.sets(st.integers(min_value=0, max_value=29)),
    st.sets(st.integers(min_value=0, max_value=29)),
)
@settings(max_examples=300, deadline=None)
def test_find_orphans_agrees_with_a_reachability_model(links: list[int], gone: set[int], absent: set[int]) -> None:
    # Block i's parent is block links[i] (-1: a chain head); links may point forward, at themselves or at
    # blocks that do not exist, so cycles and missing parents both occur. ``gone`` blocks are not stored.
    key = [bytes([i]) * 32 for i in range(32)]
    parents = {key[i]: (None if p < 0 else key[p]) for i, p in enumerate(links) if i not in gone}
    absent_keys = [key[i] for i in absent]
    model_parents = {k: p for k, p in parents.items() if k not in absent_keys}
    want = set(model_parents) - _reachable_model(model_parents)
    assert find_orphans(parents, absent=absent_keys) == want


def test_orphans_and_repair_drop_children_with_their_parents(tmp_path: Path) -> None:
    path = tmp_path / "tier"
    a, b = (
        _chain(5),
        compute_sequence_hashes(
            list(range(1000, 1000 + 3 * MODEL.page_size)), MODEL.page_size, algorithm=ALGO, namespace=NAMESPACE
        ),
    )
    with _open(path) as s:
        s.write_blocks(a + b, list(range(8)), blocks_for(a + b, MODEL))
        assert s.orphans() == [] and s.check().clean
        s.delete([a[2]])  # a[3] and a[4] can no longer be reached
        assert s.orphans() == [a[3], a[4]]
    with _open(path, readonly=True) as ro:
        assert ro.orphans() == [a[3], a[4]]
        report = ro.check()
        assert (report.checked, report.corrupt, report.orphans, report.repaired) == (7, (), (a[3], a[4]), False)
        with pytest.raises(DiskTierError, match="read-only"):
            ro.check(repair=True)
    with _open(path) as s:
        assert s.check(repair=True).orphans == (a[3], a[4])
        assert {e.hash for e in s.entries()} == {a[0], a[1], *b}
        assert s.orphans() == [] and s.check().clean


def test_check_counts_corrupt_parents_as_gone(tmp_path: Path) -> None:
    path = tmp_path / "tier"
    a = _chain(4)
    with _open(path) as s:
        s.write_blocks(a, [0, 1, 2, 3], blocks_for(a, MODEL))
        file, offset, _ = s.block_location(a[1]) or ("", 0, 0)
    with open(path / file, "r+b") as f:  # flip a byte of a[1] behind the store's back
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0x5A]))
    with _open(path) as s:
        assert s.orphans() == []  # the rows alone look fine
        assert s.verify() == [a[1]]  # verify() reports the corrupt block only
        report = s.check()
        assert (report.corrupt, report.orphans, report.clean) == ((a[1],), (a[2], a[3]), False)
        assert len(s) == 4  # nothing dropped without repair
        report = s.check(repair=True)
        assert report.repaired and [e.hash for e in s.entries()] == [a[0]]
    rows, _ = _raw_registry(path)
    assert list(rows) == [a[0]]
