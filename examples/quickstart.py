"""Quickstart: store a prompt's KV blocks, let them fall to the host tier, match them back.

    python examples/quickstart.py
"""

from __future__ import annotations

import torch

from tiered_kv import KvBlockManager, KvBlockManagerConfig, LayoutConfig, ModelConfig


def main() -> None:
    model = ModelConfig(num_layers=4, inner_dim=64, page_size=16, dtype="float16")
    config = KvBlockManagerConfig(
        model=model,
        device=LayoutConfig(num_blocks=8),  # tiny on purpose: blocks must travel to the host tier
        host=LayoutConfig(num_blocks=64),
    )
    with KvBlockManager(config) as bm:
        prompt = list(range(16 * 20))  # 20 full blocks of token ids
        hashes = bm.sequence_hashes(prompt)
        device = bm.device()
        assert device is not None
        expected = {}
        for i in range(0, len(hashes), 4):  # a "prefill" in chunks of 4 blocks
            chunk = hashes[i : i + 4]
            blocks = device.allocate_blocks(len(chunk))
            for b, h in zip(blocks, chunk):
                data = torch.full(model.block_shape, float(h[0]), dtype=model.torch_dtype)
                for layer in range(model.num_layers):
                    for outer in range(model.outer_dim):
                        b.layer_view(layer, outer).copy_(data[layer, outer])
                expected[h] = float(h[0])
            device.release_blocks(device.register_blocks(blocks, chunk))
        print(f"stored {len(hashes)} blocks through a {device.total_blocks()}-block device tier")

        # The returning prompt: its first blocks come back from the host tier, promoted to the device tier.
        matched = bm.match_sequence_hashes(hashes)
        ok = all(float(b.layer_view(0, 0)[0, 0]) == expected[b.sequence_hash] for b in matched)
        print(f"matched {len(matched)} blocks (the device tier holds {device.total_blocks()}), bytes intact: {ok}")
        for b in matched:
            b.release()
        m = bm.metrics()
        print(
            f"demotions {m['offload']['demotions']}, promotions {m['offload']['promotions']}, "
            f"host hit rate {m['host']['hit_rate']:.2f}"
        )


if __name__ == "__main__":
    main()
