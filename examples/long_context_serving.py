"""Long-context, multi-turn serving with a tiered prefix cache: TTFT with tiered_kv vs recompute.

    pip install 'tiered_kv[serving]'
    python examples/long_context_serving.py            # first run: the disk tier starts cold
    python examples/long_context_serving.py            # second run: prefixes come back from disk
    python examples/long_context_serving.py --fresh --preset tiny   # seconds; --help for every option

The same command as ``tiered-kv demo``. A Llama-shaped model (4 layers, hidden 512, GQA) is built locally with
seeded random weights: nothing is downloaded. Three users hold conversations over shared system prompts and
12k-token shared documents; the device and host tiers hold about one prompt each, so blocks are demoted to the
disk tier under ``--path`` and promoted back. Each turn prints the prompt length, the tokens matched in each tier,
the computed suffix, and TTFT with tiered_kv next to a full prefill of the same prompt (whose first-token logits
must be equal). The totals, hit rates and a PNG of TTFT per turn follow.

The serving loop itself is a few lines (see ``run_demo`` in ``tiered_kv/cli/demo.py``)::

    geometry = model_config_for(model, page_size=64)
    bm = KvBlockManager(KvBlockManagerConfig(model=geometry, device=LayoutConfig(num_blocks=266),
                                             host=LayoutConfig(num_blocks=266),
                                             disk=DiskConfig(path=".tiered_kv_demo/disk", num_blocks=1256),
                                             namespace="my-model@rev"))
    cache = TieredPrefixCache(bm, model)
    for prompt in requests:
        out, stats = cache.prefill(prompt, logits_to_keep=1)   # match, restore, compute the suffix, store
        print(stats.matched_by_tier, stats.computed_tokens, stats.ttft_s)
"""

from __future__ import annotations

from tiered_kv.cli.demo import demo

if __name__ == "__main__":
    demo(prog_name="long_context_serving.py")
