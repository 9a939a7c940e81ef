"""Replaying a request trace through the store, for capacity planning.

Trace format (the public Mooncake traces): one JSON object per line with ``timestamp`` (ms), ``input_length`` and
``output_length`` (tokens) and ``hash_ids``: the prompt's blocks of ``trace_block`` (512) tokens as remapped ids;
equal ids mean equal prefix blocks, and an id implies every block before it.

Each id is split into ``trace_block // page_size`` blocks of the store's page size; the hash of sub-block ``s``
of id ``k`` is derived from ``(namespace, k, s)`` alone, which is sound because an id already stands for its
whole prefix. The prompt's last id covers only the full pages of ``input_length``. Every block's bytes are a
function of its hash, so every block the store returns is verified.

A request is served like a prefill: match the prompt's longest cached prefix (in windows that fit the top tier:
a window the top tier cannot hold at once is matched, verified and released before the next one), then allocate,
fill and register everything after the first miss. Requests run one after another, in trace order; timestamps
are not waited for (the replay measures what would be cached, not how fast). By default each request waits for
the demotions it caused to reach the disk (``wait_demotions``): replaying faster than real time would otherwise
overflow the bounded demotion queue and drop blocks that a real-time run would have kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..config import DiskConfig, KvBlockManagerConfig, LayoutConfig, ModelConfig
from ..errors import ConfigError, NotEnoughBlocksAvailable
from ..manager import KvBlockManager
from .content import BlockContent

__all__ = ["ReplayOptions", "replay_trace", "iter_trace", "block_hashes"]


@dataclass(frozen=True, kw_only=True)
class ReplayOptions:
    """Store geometry and tier sizes for a replay (``path`` None: a temporary disk tier, deleted afterwards)."""

    path: str | None = None
    device_blocks: int = 512
    host_blocks: int = 2048
    disk_blocks: int = 8192
    page_size: int = 128
    num_layers: int = 2
    inner_dim: int = 16
    dtype: str = "float16"
    eviction: str = "arc"
    trace_block: int = 512
    limit: int | None = None
    verify: bool = True
    wait_demotions: bool = True
    writeback_s: float | None = 5.0  # DiskConfig.writeback_s: None writes blocks down only on eviction

    def __post_init__(self) -> None:
        if self.trace_block % self.page_size:
            raise ConfigError("page_size", self.page_size, f"must divide the trace's block of {self.trace_block}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError("limit", self.limit, "must be >= 0")
        self.model()

    def model(self) -> ModelConfig:
        """The block geometry."""
        return ModelConfig(num_layers=self.num_layers, inner_dim=self.inner_dim, page_size=self.page_size,
                           dtype=self.dtype)

    def config(self, path: str) -> KvBlockManagerConfig:
        """The store's configuration with its disk tier at ``path``."""
        return KvBlockManagerConfig(
            model=self.model(),
            device=LayoutConfig(num_blocks=self.device_blocks),
            host=LayoutConfig(num_blocks=self.host_blocks),
            disk=DiskConfig(path=path, num_blocks=self.disk_blocks, backend="posix", durability="none",
                            writeback_s=self.writeback_s),
            eviction=self.eviction,
        )


def iter_trace(path: str | os.PathLike[str], limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The requests of a JSONL trace (blank lines skipped); ``ValueError`` naming the line when one is bad."""
    with open(path, encoding="utf-8") as f:
        n = 0
        for lineno, line in enumerate(f, 1):
            if limit is not None and n >= limit:
                return
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                ids = doc["hash_ids"]
                int(doc["input_length"])
                if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                    raise TypeError("hash_ids must be a list of ints")
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{os.fspath(path)}:{lineno}: not a trace request ({exc})") from exc
            n += 1
            yield doc


def block_hashes(request: dict[str, Any], page_size: int, trace_block: int, namespace: str = "default") -> list[bytes]:
    """The store block hashes of one request's prompt (32 bytes each, like sha256 sequence hashes)."""
    per_id = trace_block // page_size
    ids: list[int] = request["hash_ids"]
    length = int(request["input_length"])
    out: list[bytes] = []
    for pos, k in enumerate(ids):
        subs = per_id if pos < len(ids) - 1 else min(per_id, max(0, length - trace_block * pos) // page_size)
        for s in range(subs):
            out.append(hashlib.blake2b(f"{namespace}/{k}/{s}".encode(), digest_size=32).digest())
    return out


class _Replayer:
    def __init__(self, bm: KvBlockManager, opts: ReplayOptions) -> None:
        self.bm = bm
        self.top = bm.top
        self.content = BlockContent(bm.model)
        self.verify = opts.verify
        self.window = max(1, self.top.total_blocks() // 2)
        self.counts = dict.fromkeys(("requests", "blocks", "hits", "verified", "wrong", "skipped", "registered"), 0)

    def _check(self, blocks: list[Any], hashes: list[bytes]) -> None:
        if not self.verify or not blocks:
            return
        data, bad = self.top.gather(blocks)
        self.counts["verified"] += len(blocks) - len(bad)
        self.counts["wrong"] += len(bad) + len(self.content.matches_data(data, hashes))

    def _store(self, hashes: list[bytes]) -> None:
        for i in range(0, len(hashes), self.window):
            part = hashes[i : i + self.window]
            try:
                new = self.top.allocate_blocks(len(part))
            except NotEnoughBlocksAvailable:
                self.counts["skipped"] += len(part)
                continue
            try:
                self.top.scatter(new, torch.stack([self.content.tensor(h) for h in part]))
                registered = self.top.register_blocks(new, part)
                self.counts["registered"] += len(registered)
                self.top.release_blocks(registered)
            finally:
                self.top.release_blocks(new)

    def serve(self, hashes: list[bytes]) -> None:
        self.counts["requests"] += 1
        self.counts["blocks"] += len(hashes)
        pos = 0
        while pos < len(hashes):
            want = hashes[pos : pos + self.window]
            blocks = self.bm.match_sequence_hashes(want)
            try:
                self._check(blocks, want[: len(blocks)])
            finally:
                self.top.release_blocks(blocks)
            pos += len(blocks)
            self.counts["hits"] += len(blocks)
            if len(blocks) < len(want):
                break
        if pos < len(hashes):
            self._store(hashes[pos:])


def replay_trace(
    trace: str | os.PathLike[str],
    opts: ReplayOptions,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Replay a trace through a fresh store; returns the report (hit rates per tier, bytes moved, ...)."""
    tmp = None
    path = opts.path
    if path is None:
        tmp = tempfile.mkdtemp(prefix="tiered-kv-replay-")
        path = os.path.join(tmp, "tier")
    model = opts.model()
    seen: set[int] = set()
    ideal_hits = 0
    t0 = time.perf_counter()
    try:
        with KvBlockManager(opts.config(path)) as bm:
            rp = _Replayer(bm, opts)
            per_id = opts.trace_block // opts.page_size
            for doc in iter_trace(trace, opts.limit):
                hashes = block_hashes(doc, opts.page_size, opts.trace_block, bm.config.namespace)
                ids = doc["hash_ids"]
                lead = 0
                while lead < len(ids) and ids[lead] in seen:
                    lead += 1
                ideal_hits += min(len(hashes), lead * per_id)
                seen.update(ids)
                rp.serve(hashes)
                if opts.wait_demotions and bm.scheduler.queue_depth():
                    bm.scheduler.drain()  # a disk that keeps up: no demotion is dropped for lack of queue room
                if progress is not None and rp.counts["requests"] % 100 == 0:
                    progress(rp.counts["requests"], rp.counts)
            bm.flush()
            metrics = bm.metrics()
            elapsed = time.perf_counter() - t0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    c = rp.counts
    off = metrics["offload"]
    pairs: dict[str, int] = off.get("per_pair", {})
    bb = model.block_size_bytes
    tiers = {t: metrics[t] for t in ("device", "host", "disk")}
    written_disk = sum(n for k, n in pairs.items() if k.endswith("->disk")) * bb
    registered = c["registered"] * bb
    return {
        "ok": c["wrong"] == 0,
        "trace": os.fspath(trace),
        "requests": c["requests"],
        "blocks": c["blocks"],
        "tokens": c["blocks"] * opts.page_size,
        "prefix_hit_rate": round(c["hits"] / c["blocks"], 4) if c["blocks"] else 0.0,
        "ideal_hit_rate": round(ideal_hits / c["blocks"], 4) if c["blocks"] else 0.0,
        "hit_rate": {t: round(m["hit_rate"], 4) for t, m in tiers.items()},
        "hits": {t: m["hits"] for t, m in tiers.items()},
        "served_from": _served_from(tiers),
        "blocks_verified": c["verified"],
        "wrong": c["wrong"],
        "skipped_blocks": c["skipped"],
        "promotions": off["promotions"],
        "demotions": off["demotions"],
        "bytes_promoted": off["bytes_promoted"],
        "bytes_demoted": off["bytes_demoted"],
        # Every block that reached the disk tier (demotion from either memory tier, or writeback) was one write.
        "bytes_written_disk": written_disk,
        "bytes_registered": registered,
        "disk_write_amplification": round(written_disk / registered, 4) if registered else None,
        "bytes_read_disk": sum(n for k, n in pairs.items() if k.startswith("disk->")) * bb,
        "per_pair_blocks": pairs,
        "dropped_demotions": off["dropped_demotions"],
        "evictions": {t: m["evictions"] for t, m in tiers.items()},
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(c["requests"] / elapsed, 1) if elapsed > 0 else 0.0,
        "config": {
            "page_size": opts.page_size,
            "block_bytes": bb,
            "device_blocks": opts.device_blocks,
            "host_blocks": opts.host_blocks,
            "disk_blocks": opts.disk_blocks,
            "device_bytes": opts.device_blocks * bb,
            "host_bytes": opts.host_blocks * bb,
            "disk_bytes": opts.disk_blocks * bb,
            "eviction": opts.eviction,
            "writeback_s": opts.writeback_s,
        },
    }


def _served_from(tiers: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Blocks found in each tier (a match looks in device, then host, then disk)."""
    return {t: int(m["hits"]) for t, m in tiers.items()}
