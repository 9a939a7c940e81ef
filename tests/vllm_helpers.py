"""Helpers for the vLLM integration tests: a real TieringOffloadingSpec on CPU, chunk contents, job drivers.

Imported by tests/test_integration_vllm.py and by the child process tests/vllm_child.py (vLLM must import).
"""

from __future__ import annotations

import hashlib
import mmap
import uuid
from typing import Any

import numpy as np
from vllm.v1.kv_offload.base import OffloadKey, ReqContext, ScheduleEndContext, make_offload_key
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.tiering.base import TransferJob
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

MODULE = "tiered_kv.integrations.vllm"
END_STEP = ScheduleEndContext(new_req_ids=(), preempted_req_ids=())


def offloading_config(
    chunk_bytes: int,
    *,
    primary_chunks: int = 8,
    model: str = "test-org/test-model",
    dtype: str = "float16",
    tp_size: int = 1,
    tiers: list[dict[str, Any]] | None = None,
    events: bool = False,
    extra: dict[str, Any] | None = None,
) -> OffloadingConfig:
    """vLLM's normalized offloading config for a one-group model whose chunk is ``chunk_bytes`` (4 KiB multiple)."""
    return OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=("model.layers.0.attn",), group_id=0),),
        worker_kv_bytes_per_block=chunk_bytes // tp_size,
        enable_kv_cache_events=events,
        extra_config={
            "cpu_bytes_to_use": chunk_bytes * primary_chunks,
            "secondary_tiers": tiers or [],
            **(extra or {}),
        },
        engine_id=f"tkv-test-{uuid.uuid4().hex}",
        model=OffloadingModelConfig(name=model, dtype=dtype),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(
            rank=0, world_size=tp_size, tp_size=tp_size, pp_size=1, pcp_size=1, dcp_size=1,
            data_parallel_index=0, data_parallel_size=1, data_parallel_rank_local=None,
            is_parallelism_agnostic=False,
        ),
    )


def tier_entry(path: str, num_blocks: int, **more: Any) -> dict[str, Any]:
    """One ``secondary_tiers`` entry, as a user writes it in --kv-transfer-config."""
    return {"type": "TieredKvTier", "module_path": MODULE, "path": path, "num_blocks": num_blocks, **more}


def spec_with_tier(chunk_bytes: int, path: str, num_blocks: int, *, primary_chunks: int = 8, events: bool = False,
                   model: str = "test-org/test-model", **more: Any) -> TieringOffloadingSpec:
    cfg = offloading_config(chunk_bytes, primary_chunks=primary_chunks, events=events, model=model,
                            tiers=[tier_entry(path, num_blocks, **more)])
    return TieringOffloadingSpec(cfg)


def key(stream: str, i: int) -> OffloadKey:
    """A vLLM offload key: a 32-byte block hash (sha256, vLLM's default) plus group index 0."""
    return make_offload_key(hashlib.sha256(f"{stream}/{i}".encode()).digest(), 0)


def content(k: bytes, nbytes: int) -> np.ndarray:
    """The bytes a chunk with key ``k`` holds in these tests (deterministic, distinct per key)."""
    seed = int.from_bytes(hashlib.sha256(k).digest()[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)


def aligned_rows(num_chunks: int, chunk_bytes: int) -> tuple[np.ndarray, memoryview]:
    """A page-aligned ``[num_chunks, chunk_bytes]`` uint8 array and its memoryview (a stand-in primary tier)."""
    raw = np.zeros(num_chunks * chunk_bytes + mmap.PAGESIZE, dtype=np.uint8)
    skip = (-raw.ctypes.data) % mmap.PAGESIZE
    arr = raw[skip : skip + num_chunks * chunk_bytes].reshape(num_chunks, chunk_bytes)
    return arr, memoryview(arr)


def job(job_id: int, keys: list[OffloadKey], chunk_ids: list[int], *, promotion: bool,
        req: str = "req") -> TransferJob:
    return TransferJob(job_id=job_id, keys=keys, chunk_ids=np.array(chunk_ids, dtype=np.int32),
                       is_promotion=promotion, req_context=ReqContext(req_id=req))


def store_through_manager(manager: Any, keys: list[OffloadKey], req: str = "store") -> None:
    """What vLLM does for newly computed chunks: GPU -> primary (we write the bytes), then the cascade to the tiers.

    Returns once every tier has finished and the manager has processed the results.
    """
    ctx = ReqContext(req_id=req)
    manager.on_new_request(ctx)
    out = manager.prepare_store(keys, ctx)
    assert out is not None, "the primary tier could not take the chunks"
    rows = np.frombuffer(manager.primary_tier.get_kv_memoryview(), dtype=np.uint8).reshape(
        manager.primary_tier._num_chunks, -1
    )
    ids = [int(c) for c in out.store_spec.chunk_ids]
    for k, cid in zip(out.keys_to_store, ids, strict=True):
        rows[cid] = content(k, rows.shape[1])
    manager.complete_store(out.keys_to_store, ctx)
    for tier in manager.secondary_tiers:
        tier.drain_jobs()
    manager._process_finished_jobs()
    manager.on_request_finished(ctx)
    manager.on_schedule_end(END_STEP)
