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
    bad_idx = [1, 6, 10]
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

    before = fingerprint_files(tier.path)
    plain, show_bad = cli_many(
        ["disk", "verify", str(tier.path)],
        ["disk", "show", str(tier.path), tier.hashes[6].hex(), "--json"],
    )
    assert plain.rc == 1, (plain.out, plain.err)
    named = {line.split()[1] for line in plain.out.splitlines() if line.startswith("corrupt ")}
    assert named == bad and f"3 corrupt of {NUM_BLOCKS} blocks" in plain.out
    assert show_bad.rc == 1 and show_bad.json()["verdict"] == "corrupt" and show_bad.json()["layers"] == []
    assert fingerprint_files(tier.path) == before, "verify without --repair changed the tier"

    repair = cli("disk", "verify", str(tier.path), "--repair")
    assert repair.rc == 1, (repair.out, repair.err)  # corrupt blocks were found (and dropped)
    assert {line.split()[1] for line in repair.out.splitlines() if line.startswith("corrupt ")} == bad

    again, gone = cli_many(
        ["disk", "verify", str(tier.path), "--json"],
        ["disk", "show", str(tier.path), tier.hashes[6].hex()],
    )
    assert again.rc == 0, (again.out, again.err)
    assert again.json()["corrupt"] == [] and again.json()["checked"] == NUM_BLOCKS - len(bad_idx)
    assert_one_line_error(gone, 2, "not in the disk tier")

    # every good block is still there with its original bytes
    with manager(tier.path) as bm:
        pool = bm.disk()
        assert pool is not None
        for i, h in enumerate(tier.hashes):
            found = pool.match_sequence_hashes([h])
            if i in bad_idx:
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
