"""CUDA paths: device arena on the GPU, pinned host tier, copies on a dedicated stream, kvikio disk I/O.

Run with ``python -m pytest -m gpu`` on a machine with CUDA; skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kvdata import SMALL, content_for

from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, LayoutConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _fill(bm: KvBlockManager, hs: list[bytes]) -> None:
    for i in range(0, len(hs), 4):
        part = hs[i : i + 4]
        blocks = bm.top.allocate_blocks(len(part))
        bm.top.scatter(blocks, torch.stack([content_for(h) for h in part]).to("cuda"))
        bm.top.release_blocks(bm.top.register_blocks(blocks, part))


def _check(blocks: list) -> None:
    for b in blocks:
        data = torch.stack([torch.stack([b.layer_view(lyr, o) for o in range(2)]) for lyr in range(SMALL.num_layers)])
        assert data.device.type == "cuda"
        assert torch.equal(data.cpu(), content_for(b.sequence_hash))


@pytest.mark.parametrize("backend", ["posix", "auto", "kvikio"])
def test_three_tiers_on_cuda(tmp_path: Path, backend: str) -> None:
    if backend == "kvikio":
        from tiered_kv.storage.disk import kvikio_unavailable_reason

        reason = kvikio_unavailable_reason()
        if reason is not None:
            pytest.skip(f"kvikio unusable here: {reason}")
    cfg = KvBlockManagerConfig(
        model=SMALL,
        device=LayoutConfig(num_blocks=8),
        host=LayoutConfig(num_blocks=8),
        disk=DiskConfig(path=str(tmp_path), num_blocks=64, backend=backend),
        device_type="cuda",
    )
    with KvBlockManager(cfg) as bm:
        assert bm.device().storage.device.type == "cuda"  # type: ignore[union-attr]
        assert bm.host().storage.pinned  # type: ignore[union-attr]
        hs = bm.sequence_hashes(list(range(4 * 40)))
        _fill(bm, hs)
        bm.flush()
        got = bm.match_sequence_hashes(hs)
        assert [b.sequence_hash for b in got] == hs[:8]
        _check(got)
        bm.top.release_blocks(got)
        m = bm.metrics()["offload"]
        assert m["promotions"] >= 8 and m["demotions"] >= 32
    with KvBlockManager(cfg) as bm:  # restart: the prefix comes back from disk to the GPU
        if backend == "kvikio":
            assert bm.disk().storage.accepts_cuda  # type: ignore[union-attr]  # reads land in GPU memory
        got = bm.match_sequence_hashes(hs)
        assert len(got) >= 1
        _check(got)
        bm.top.release_blocks(got)


def test_swap_on_cuda(tmp_path: Path) -> None:
    cfg = KvBlockManagerConfig(
        model=SMALL, device=LayoutConfig(num_blocks=8), host=LayoutConfig(num_blocks=8), device_type="cuda"
    )
    with KvBlockManager(cfg) as bm:
        hs = bm.sequence_hashes(list(range(4 * 4)))
        dev = bm.top.allocate_blocks(4)
        bm.top.scatter(dev, torch.stack([content_for(h) for h in hs]).to("cuda"))
        dev = bm.top.register_blocks(dev, hs)
        host = bm.swap_out(dev)
        bm.top.release_blocks(dev)
        bm.trigger_eviction("aggressive")
        back = bm.swap_in(host)
        _check(back)
        bm.top.release_blocks(back)
        bm.host().release_blocks(host)  # type: ignore[union-attr]
