"""Seed 004 (KvBlockManager): the engine itself, with a named worker, blockset export/import and tiers.

    python examples/seed_004_block_manager.py
"""

from __future__ import annotations

import tempfile

import torch

from tiered_kv import DiskConfig, DType, KvBlockManager, KvBlockManagerConfig, LayoutConfig, ModelConfig


def main() -> None:
    model = ModelConfig(num_layers=4, inner_dim=128, page_size=16, outer_dim=2, dtype=DType.FLOAT16)
    with tempfile.TemporaryDirectory() as path:
        config = KvBlockManagerConfig(model=model, device=LayoutConfig(num_blocks=8),
                                      host=LayoutConfig(num_blocks=16, layout="layer_separate"),
                                      disk=DiskConfig(path=path, num_blocks=64), worker_id="worker-0")
        with KvBlockManager(config) as bm:
            device = bm.device()
            assert device is not None
            hashes = bm.sequence_hashes(list(range(16 * 12)))
            for i in range(0, 12, 4):
                blocks = device.allocate_blocks(4)
                for b in blocks:
                    b.write(0, 0, torch.ones(16, 128, dtype=model.torch_dtype))
                device.release_blocks(device.register_blocks(blocks, hashes[i : i + 4]))
            prefix = hashes[:6]  # blocks 0-3 were demoted to the host tier; they are promoted back
            matched = bm.match_sequence_hashes(prefix)
            print(f"matched {len(matched)}/{len(prefix)} blocks across tiers "
                  f"(device {device.total_blocks()}, host {bm.host().total_blocks()})")  # type: ignore[union-attr]
            device.release_blocks(matched)
            blockset = bm.export_local_blockset()
            config2 = KvBlockManagerConfig(model=model, host=LayoutConfig(num_blocks=4), worker_id="worker-1")
            with KvBlockManager(config2) as peer:
                who = peer.import_remote_blockset(blockset)
                print(f"{peer.worker_id} knows {who} holds a {peer.peer_holders(hashes)[who]}-block prefix")
            m = bm.metrics()
            print(f"device evictions {m['device']['evictions']}, "
                  f"residency {m['device']['residency']['mean_s'] * 1e3:.2f} ms, ARC {m['device']['policy']}")


if __name__ == "__main__":
    main()
