"""``tiered-kv disk stat|ls|show|verify`` through the real console script, in subprocesses.

Tiers are made with the public API in this process (and closed before the CLI runs), except for the live-writer
test, where a child process holds the tier open and keeps registering blocks while the CLI reads it. Independent
CLI runs are started together (each pays ~1 s of interpreter and torch start-up).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import lmdb
import msgpack
import pytest
import torch

from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, ModelConfig

CLI = Path(sys.executable).parent / "tiered-kv"
REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(num_layers=2, inner_dim=8, page_size=4, dtype="float16")
CAPACITY = 32
NUM_BLOCKS = 12

pytestmark = pytest.mark.skipif(not CLI.exists(), reason=f"console script {CLI} is not installed")


@dataclass
class Result:
    """One finished CLI run."""

    args: tuple[str, ...]
    rc: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TIERED_KV_DEBUG", None)
    env["COLUMNS"] = "200"
    # The console script must run THIS checkout's tiered_kv, not whichever one the environment installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def cli_many(*commands: Sequence[str], timeout: float = 120) -> list[Result]:
    """Run several ``tiered-kv`` commands, as many at once as there are CPUs; results in the order given."""

    def run(cmd: Sequence[str]) -> Result:
        p = subprocess.run([str(CLI), *cmd], capture_output=True, text=True, env=_env(), timeout=timeout)
        return Result(tuple(cmd), p.returncode, p.stdout, p.stderr)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return list(pool.map(run, commands))


def cli(*args: str) -> Result:
    """Run one ``tiered-kv`` command."""
    return cli_many(args)[0]


def block_data(i: int) -> torch.Tensor:
    """Distinct, recognisable data for block ``i`` (layer l, part o is centred on 10*i + 2*l + o)."""
    g = torch.Generator().manual_seed(i)
    base = torch.arange(MODEL.num_layers * MODEL.outer_dim, dtype=torch.float32).reshape(
        MODEL.num_layers, MODEL.outer_dim
    )
    noise = torch.rand(MODEL.block_shape, generator=g)  # in [0, 1)
    return (noise + 10 * i + base[:, :, None, None]).to(MODEL.torch_dtype)


def manager(path: Path) -> KvBlockManager:
    return KvBlockManager(
        KvBlockManagerConfig(
            model=MODEL, disk=DiskConfig(path=path, num_blocks=CAPACITY, backend="posix"), device_type="cpu"
        )
    )


@dataclass
class Tier:
    path: Path
    hashes: list[bytes]
    data: list[torch.Tensor]


def make_tier(path: Path) -> Tier:
    """A closed tier holding NUM_BLOCKS blocks with :func:`block_data` contents."""
    data = [block_data(i) for i in range(NUM_BLOCKS)]
    with manager(path) as bm:
        pool = bm.disk()
        assert pool is not None
        hashes = bm.sequence_hashes(list(range(NUM_BLOCKS * MODEL.page_size)))
        blocks = pool.allocate_blocks(NUM_BLOCKS)
        for blk, d in zip(blocks, data):
            for layer in range(MODEL.num_layers):
                for outer in range(MODEL.outer_dim):
                    blk.layer_view(layer, outer).copy_(d[layer, outer])
        for imm in pool.register_blocks(blocks, hashes):
            imm.release()
        for blk in blocks:
            blk.release()
        bm.flush()
    return Tier(path, [bytes(h) for h in hashes], data)


@pytest.fixture
def tier(tmp_path: Path) -> Tier:
    return make_tier(tmp_path / "tier")


def fingerprint_files(path: Path) -> dict[str, str]:
    """sha256 of every file of the tier except LMDB's lock file (readers take a slot there by design)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "lock.mdb"
    }


def assert_one_line_error(r: Result, code: int, *needles: str) -> None:
    assert r.rc == code, (r.args, r.rc, r.out, r.err)
    assert "Traceback" not in r.err, (r.args, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiered-kv: error:"), (r.args, r.err)
    for n in needles:
        assert n.lower() in lines[0].lower(), (r.args, n, lines[0])


# -- tests ----------------------------------------------------------------------------------------
def test_help_documents_exit_codes() -> None:
    top = cli("--help")
    assert top.rc == 0
    for code in ("0", "1", "2", "3"):
        assert f"  {code}  " in top.out
    assert "disk" in top.out


def test_read_commands(tier: Tier) -> None:
    before = fingerprint_files(tier.path)
    h0 = tier.hashes[0].hex()
    stat_j, stat_t, ls_j, ls_t, show_j, show_t = cli_many(
        ["disk", "stat", str(tier.path), "--json"],
        ["disk", "stat", str(tier.path)],
        ["disk", "ls", str(tier.path), "--json"],
        ["disk", "ls", str(tier.path), "--limit", "3", "--sort", "age"],
        ["disk", "show", str(tier.path), tier.hashes[5].hex(), "--json"],
        ["disk", "show", str(tier.path), h0.upper()],  # hex digits in either case
    )
    for r in (stat_j, stat_t, ls_j, ls_t, show_j, show_t):
        assert r.rc == 0 and r.err == "", (r.args, r.rc, r.err)

    s = stat_j.json()
    assert (s["capacity_blocks"], s["blocks_used"], s["blocks_free"]) == (CAPACITY, NUM_BLOCKS, CAPACITY - NUM_BLOCKS)
    assert s["format_version"] == 2 and s["hash_algorithm"] == "sha256" and s["namespace"] == "default"
    assert s["fingerprint"] == MODEL.fingerprint() and s["model"]["inner_dim"] == MODEL.inner_dim
    assert s["hit_histogram"] == {"0": NUM_BLOCKS} and s["oldest_block"] is not None
    assert s["bytes_on_disk"] > 0
    for text in (MODEL.fingerprint(), "sha256", "blocks used", f"{NUM_BLOCKS} (", "hash algorithm"):
        assert text in stat_t.out

    listing = ls_j.json()
    assert listing["total"] == NUM_BLOCKS
    assert {b["hash"] for b in listing["blocks"]} == {h.hex() for h in tier.hashes}
    assert all(b["size"] == MODEL.block_size_bytes and b["hits"] == 0 for b in listing["blocks"])
    assert "3 of 12 blocks" in ls_t.out and sum(h.hex() in ls_t.out for h in tier.hashes) == 3

    doc = show_j.json()
    assert doc["hash"] == tier.hashes[5].hex() and doc["checksum_ok"] is True and doc["verdict"] == "ok"
    assert doc["size"] == MODEL.block_size_bytes and not os.path.isabs(doc["file"])
    # file/offset/size point at exactly the block's bytes
    with open(tier.path / doc["file"], "rb") as f:
        f.seek(doc["offset"])
        raw = f.read(doc["size"])
    assert raw == tier.data[5].contiguous().view(torch.uint8).numpy().tobytes()
    # per-layer K/V statistics are those of the data
    assert len(doc["layers"]) == MODEL.num_layers
    for layer, row in enumerate(doc["layers"]):
        for outer, part in enumerate(("K", "V")):
            want = tier.data[5][layer, outer].double()
            got = row[part]
            assert got["min"] == pytest.approx(float(want.min())) and got["max"] == pytest.approx(float(want.max()))
            assert got["mean"] == pytest.approx(float(want.mean()), rel=1e-6) and got["nan"] == 0
    for text in (h0, "OK", "per-layer", "data-000.bin"):
        assert text in show_t.out

    assert fingerprint_files(tier.path) == before, "a read command changed the tier"


def test_verify_flipped_bytes_then_repair(tier: Tier) -> None:
    # The tier is one chain of NUM_BLOCKS blocks: the blocks after a corrupt one are orphans (no match reaches them).
    bad_idx = [6, 10]
    orphan_idx = [7, 8, 9, 11]
    kept = range(6)
    for i in bad_idx:
        # Find the block by its bytes (show --json's file/offset are checked in test_read_commands); saves a run.
        raw = tier.data[i].contiguous().view(torch.uint8).numpy().tobytes()
        hits = [(p, p.read_bytes().find(raw)) for p in sorted(tier.path.glob("data-*.bin"))]
        [(file, offset)] = [(p, off) for p, off in hits if off >= 0]
        with open(file, "r+b") as f:
            f.seek(offset + 17)
            byte = f.read(1)
            f.seek(offset + 17)
            f.write(bytes([byte[0] ^ 0x5A]))
    bad = {tier.hashes[i].hex() for i in bad_idx}
    orphans = [tier.hashes[i].hex() for i in orphan_idx]

    before = fingerprint_files(tier.path)
    plain, show_bad = cli_many(
        ["disk", "verify", str(tier.path)],
        ["disk", "show", str(tier.path), tier.hashes[6].hex(), "--json"],
    )
    assert plain.rc == 1, (plain.out, plain.err)
    named = {line.split()[1] for line in plain.out.splitlines() if line.startswith("corrupt ")}
    assert named == bad
    assert [line.split()[1] for line in plain.out.splitlines() if line.startswith("orphan ")] == orphans
    assert f"2 corrupt and 4 orphans (blocks whose parent is not on disk) of {NUM_BLOCKS} blocks" in plain.out
    assert show_bad.rc == 1 and show_bad.json()["verdict"] == "corrupt" and show_bad.json()["layers"] == []
    assert fingerprint_files(tier.path) == before, "verify without --repair changed the tier"

    repair = cli("disk", "verify", str(tier.path), "--repair")
    assert repair.rc == 1, (repair.out, repair.err)  # corrupt blocks were found (and dropped)
    assert {line.split()[1] for line in repair.out.splitlines() if line.startswith("corrupt ")} == bad
    assert [line.split()[1] for line in repair.out.splitlines() if line.startswith("orphan ")] == orphans
    assert "dropped them, the tier is clean now" in repair.out

    again, gone = cli_many(
        ["disk", "verify", str(tier.path), "--json"],
        ["disk", "show", str(tier.path), tier.hashes[6].hex()],
    )
    assert again.rc == 0, (again.out, again.err)
    assert again.json()["corrupt"] == again.json()["orphans"] == [] and again.json()["checked"] == len(kept)
    assert_one_line_error(gone, 2, "not in the disk tier")

    # every block before the first corrupt one is still there with its original bytes, and nothing else
    with manager(tier.path) as bm:
        pool = bm.disk()
        assert pool is not None
        for i, h in enumerate(tier.hashes):
            found = pool.match_sequence_hashes([h])
            if i not in kept:
                assert found == []
                continue
            assert len(found) == 1
            blk = found[0]
            got = torch.stack(
                [torch.stack([blk.layer_view(la, o) for o in range(MODEL.outer_dim)]) for la in range(MODEL.num_layers)]
            )
            assert torch.equal(got.view(torch.uint8), tier.data[i].view(torch.uint8)), f"block {i} changed"
            blk.release()


WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, ModelConfig

    model = ModelConfig(num_layers=2, inner_dim=8, page_size=4, dtype="float16")
    cfg = KvBlockManagerConfig(
        model=model, disk=DiskConfig(path=sys.argv[1], num_blocks=64, backend="posix"), device_type="cpu"
    )
    bm = KvBlockManager(cfg)
    pool = bm.disk()
    i = 0
    while True:
        hashes = bm.sequence_hashes([i * 1000 + t for t in range(4 * model.page_size)])
        blocks = pool.allocate_blocks(4)
        for k, blk in enumerate(blocks):
            for layer in range(model.num_layers):
                for outer in range(model.outer_dim):
                    blk.layer_view(layer, outer).fill_(float(i % 100 + k))
        for imm in pool.register_blocks(blocks, hashes):
            imm.release()
        for blk in blocks:
            blk.release()
        if i % 4 == 0:
            bm.flush()
            print(i, flush=True)
        i += 1
        time.sleep(0.002)
    """
)


@pytest.fixture
def live_writer(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    path = tmp_path / "live"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # first flush done: the tier exists and holds blocks
        assert line.strip() == "0", (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        yield path, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_reads_while_a_writer_holds_the_tier(live_writer: tuple[Path, subprocess.Popen[str]]) -> None:
    path, proc = live_writer
    stat, listing, check, repair = cli_many(
        ["disk", "stat", str(path), "--json"],
        ["disk", "ls", str(path), "--json", "--sort", "hits"],
        ["disk", "verify", str(path)],
        ["disk", "verify", str(path), "--repair"],
    )
    assert proc.poll() is None, "the writer died"
    for r in (stat, listing, check):
        assert r.rc == 0 and "Traceback" not in r.err, (r.args, r.rc, r.out, r.err)
    s = stat.json()
    assert s["capacity_blocks"] == 64 and s["blocks_used"] > 0 and s["blocks_used"] + s["blocks_free"] == 64
    assert 0 < listing.json()["total"] <= 64
    assert "all good" in check.out
    assert_one_line_error(repair, 3, "already open for writing", "pid=", "writer lock")
    # the writer kept writing through all of it
    assert proc.stdout is not None and proc.stdout.readline().strip().isdigit()


def test_commands_needing_the_writer_lock_exit_3_naming_the_holder(tier: Tier) -> None:
    """The lock is held through another open file description, as another process would hold it."""
    import fcntl

    fd = os.open(tier.path / "writer.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"pid=4242 host=elsewhere\n", 0)
        before = fingerprint_files(tier.path)
        repair, compact, read = cli_many(
            ["disk", "verify", str(tier.path), "--repair"],
            ["disk", "compact", str(tier.path)],
            ["disk", "verify", str(tier.path)],
        )
    finally:
        os.close(fd)
    for r in (repair, compact):
        assert_one_line_error(
            r, 3, f"disk tier {tier.path} is already open for writing by pid=4242 host=elsewhere", "writer lock"
        )
    assert read.rc == 0 and "all good" in read.out, (read.out, read.err)  # readers need no lock
    assert fingerprint_files(tier.path) == before


def test_bad_input(tmp_path: Path, tier: Tier) -> None:
    (tmp_path / "empty").mkdir()

    future = tmp_path / "future"
    make_tier(future)
    env = lmdb.open(str(future / "registry"), max_dbs=2)
    db = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        meta = msgpack.unpackb(txn.get(b"meta", db=db))
        meta["format_version"] = 99
        txn.put(b"meta", msgpack.packb(meta), db=db)
    env.close()

    garbled = tmp_path / "garbled"
    make_tier(garbled)
    (garbled / "registry" / "data.mdb").write_bytes(os.urandom(64 * 1024))

    missing = tmp_path / "missing"
    make_tier(missing)
    (missing / "data-003.bin").unlink()

    h = tier.hashes[0].hex()
    absent = hashlib.sha256(b"never stored").hexdigest()
    t = str(tier.path)
    cases = {
        "no such path": (["disk", "stat", str(tmp_path / "nope")], "no such file"),
        "empty dir": (["disk", "stat", str(tmp_path / "empty")], "not a disk tier"),
        "future version": (["disk", "stat", str(future), "--json"], "format version 99"),
        "garbled registry": (["disk", "ls", str(garbled)], "not a readable disk tier"),
        "missing data file": (["disk", "stat", str(missing)], "data-003.bin"),
        "hash not hex": (["disk", "show", t, "zz" + h[2:]], "not hexadecimal"),
        "hash too short": (["disk", "show", t, h[:-2]], "62 hex digits"),
        "hash absent": (["disk", "show", t, absent, "--json"], "not in the disk tier"),
    }
    results = cli_many(*(args for args, _ in cases.values()))
    for (name, (_, needle)), r in zip(cases.items(), results):
        assert_one_line_error(r, 2, needle)
        assert r.out == "", (name, r.out)


def _chain_tier(path: Path, n: int, drop: int) -> list[bytes]:
    """A closed tier holding one chain of ``n`` blocks, of which block ``drop`` was then deleted (an orphaned tail)."""
    from tiered_kv import compute_sequence_hashes
    from tiered_kv.storage.disk import DiskStore

    hashes = compute_sequence_hashes(list(range(n * MODEL.page_size)), MODEL.page_size)
    config = DiskConfig(path=path, num_blocks=CAPACITY, backend="posix")
    with DiskStore(config, MODEL, hash_algorithm="sha256", namespace="default") as store:
        store.write_blocks(hashes, list(range(n)), torch.stack([block_data(i) for i in range(n)]))
        store.delete([hashes[drop]])
    return [bytes(h) for h in hashes]


def test_orphans_stat_verify_repair(tmp_path: Path) -> None:
    path = tmp_path / "tier"
    hashes = _chain_tier(path, 30, drop=3)  # blocks 4..29 are orphans: more than the text output lists
    orphans = [h.hex() for h in hashes[4:]]
    before = fingerprint_files(path)
    stat_j, stat_t, ver_j, ver_t = cli_many(
        ["disk", "stat", str(path), "--json"],
        ["disk", "stat", str(path)],
        ["disk", "verify", str(path), "--json"],
        ["disk", "verify", str(path)],
    )
    assert stat_j.rc == stat_t.rc == 0, (stat_j.err, stat_t.err)
    s = stat_j.json()
    assert (s["blocks_used"], s["chains"], s["reachable_blocks"], s["orphan_blocks"]) == (29, 1, 3, 26)
    assert "3 of 29 blocks; 26 orphans" in stat_t.out and "chains" in stat_t.out
    assert ver_j.rc == ver_t.rc == 1, (ver_j.out, ver_j.err)
    v = ver_j.json()
    assert (v["checked"], v["corrupt"], v["orphans"], v["clean"], v["dropped"]) == (29, [], orphans, False, 0)
    listed = [line.split()[1] for line in ver_t.out.splitlines() if line.startswith("orphan ")]
    assert listed == orphans[:20] and "... and 6 more orphans (--json lists them all)" in ver_t.out
    assert "26 orphans (blocks whose parent is not on disk) of 29 blocks checked; run with --repair" in ver_t.out
    assert fingerprint_files(path) == before, "a read command changed the tier"

    repair = cli("disk", "verify", str(path), "--repair", "--json")
    assert repair.rc == 1 and repair.json()["dropped"] == 26 and repair.json()["orphans"] == orphans
    again, stat_after = cli_many(["disk", "verify", str(path)], ["disk", "stat", str(path), "--json"])
    assert again.rc == 0 and "3 blocks checked: all good" in again.out, (again.out, again.err)
    s = stat_after.json()
    assert (s["blocks_used"], s["chains"], s["reachable_blocks"], s["orphan_blocks"]) == (3, 1, 3, 0)


def test_reads_a_format_version_1_tier_and_repair_migrates_it(tmp_path: Path) -> None:
    path = tmp_path / "tier"
    hashes = _chain_tier(path, 5, drop=4)
    # Rewrite the registry as format version 1 wrote it: rows of 6 fields (no tokens, no parent), meta version 1.
    env = lmdb.open(str(path / "registry"), max_dbs=2)
    blocks, meta_db = env.open_db(b"blocks"), env.open_db(b"meta")
    with env.begin(write=True) as txn:
        for key, raw in list(txn.cursor(db=blocks)):
            txn.put(key, msgpack.packb(msgpack.unpackb(raw)[:6]), db=blocks)
        meta = msgpack.unpackb(txn.get(b"meta", db=meta_db))
        txn.put(b"meta", msgpack.packb({**meta, "format_version": 1}), db=meta_db)
    env.close()
    before = fingerprint_files(path)
    stat_j, ls_j, ver = cli_many(
        ["disk", "stat", str(path), "--json"], ["disk", "ls", str(path), "--json"], ["disk", "verify", str(path)]
    )
    assert stat_j.rc == ls_j.rc == ver.rc == 0, (stat_j.err, ls_j.err, ver.out, ver.err)
    s = stat_j.json()
    # Version 1 rows have no parents: every block is a chain head of its own.
    assert (s["format_version"], s["blocks_used"], s["chains"], s["reachable_blocks"]) == (1, 4, 4, 4)
    assert sorted(b["hash"] for b in ls_j.json()["blocks"]) == sorted(h.hex() for h in hashes[:4])
    assert fingerprint_files(path) == before, "a read command changed a version 1 tier"
    repaired = cli("disk", "verify", str(path), "--repair")
    assert repaired.rc == 0, (repaired.out, repaired.err)
    after = cli("disk", "stat", str(path), "--json").json()
    assert (after["format_version"], after["blocks_used"], after["chains"]) == (2, 4, 4)
