"""TTFT of a long prompt whose prefix comes back from disk after a restart, against a full prefill (recompute).

    python tools/bench_ttft.py [--lengths 4096 16384 32768] [--suffix 256] [--json]

For each length: a manager with a tiny device tier and a disk tier stores the prompt minus its last ``suffix``
tokens (prefill + persist), is closed, and a NEW manager on the same disk tier (a restart) serves the full prompt:
TTFT = match and promotion from disk + restore into a DynamicCache + the suffix's forward pass. The baseline is a
full prefill of the same prompt by the same model in the same run. Logits of the last token are compared.
Needs the ``serving`` extra (transformers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import torch

from tiered_kv import DiskConfig, KvBlockManager, KvBlockManagerConfig, LayoutConfig, RemoteConfig
from tiered_kv.cli.demo import DemoModelSpec, build_model
from tiered_kv.integrations.transformers import TieredPrefixCache, model_config_for

PAGE = 64


def _manager(path: str | None, model: Any, tokens: int, spec: DemoModelSpec, remote: str | None = None,
             namespace: str | None = None) -> KvBlockManager:
    """A device tier plus a disk tier (``path``) or the remote tier only (``remote``: another node's view)."""
    blocks = tokens // PAGE + 8
    return KvBlockManager(
        KvBlockManagerConfig(
            model=model_config_for(model, page_size=PAGE),
            device=LayoutConfig(num_blocks=blocks),
            disk=DiskConfig(path=path, num_blocks=blocks, backend="auto") if path else None,
            remote=RemoteConfig(url=remote, mode="write_through", timeout=5.0) if remote else None,
            namespace=namespace or spec.namespace(),
            device_type="cpu",
        )
    )


def measure(model: Any, spec: DemoModelSpec, length: int, suffix: int, tmp: str,
            remote: str | None = None) -> dict[str, Any]:
    """One prompt length: restored-prefix TTFT vs full-prefill TTFT, and the logits' largest difference.

    Without ``remote``: the prefix comes back from disk after a restart. With ``remote`` (a Redis URL): one
    manager writes the prefix through to Redis, and a second manager with an empty device tier and no disk (a
    second serving node) restores it from there.
    """
    g = torch.Generator().manual_seed(length)
    prompt = torch.randint(0, spec.vocab, (length,), generator=g).tolist()
    path = f"{tmp}/ttft-{length}"
    namespace = f"{spec.namespace()}-{time.time_ns()}" if remote else None
    with torch.inference_mode():
        first = _manager(None if remote else path, model, length, spec, remote, namespace)
        with first as bm:
            TieredPrefixCache(bm, model).prefill(prompt[: length - suffix], logits_to_keep=1)
            bm.persist()
            bm.flush()
        # The restart (or the second node): only the disk tier (or the remote tier) is warm.
        with _manager(None if remote else path, model, length, spec, remote, namespace) as bm:
            t0 = time.perf_counter()
            out, stats = TieredPrefixCache(bm, model, store=False).prefill(prompt, logits_to_keep=1)
            restored = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = model(torch.tensor([prompt]), logits_to_keep=1)
        recompute = time.perf_counter() - t0
    diff = float((out.logits[0, -1].float() - full.logits[0, -1].float()).abs().max())
    return {
        "tokens": length,
        "source": "remote" if remote else "disk",
        "matched_tokens": stats.matched_tokens,
        "matched_from_disk": stats.matched_by_tier["disk"],
        "computed_tokens": stats.computed_tokens,
        "ttft_restore_s": restored,
        "ttft_recompute_s": recompute,
        "speedup": recompute / restored,
        "max_logit_diff": diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--suffix", type=int, default=256, help="new tokens after the cached prefix")
    ap.add_argument("--remote", default=None, help="redis://host:port: measure a second node restoring from Redis")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = DemoModelSpec()
    model = build_model(spec)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(model, spec, n, args.suffix, tmp, args.remote) for n in args.lengths]
    if args.json:
        print(json.dumps({"model": spec.namespace(), "suffix": args.suffix, "rows": rows}))
        return
    where = f"from Redis by a second node ({args.remote})" if args.remote else "from disk after a restart"
    print(f"model {spec.namespace()}, suffix {args.suffix} tokens, prefix restored {where}")
    print(f"{'tokens':>7} {'restore s':>10} {'recompute s':>12} {'speedup':>8} {'max |dlogit|':>13}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['ttft_restore_s']:>10.3f} {r['ttft_recompute_s']:>12.3f} {r['speedup']:>7.1f}x "
              f"{r['max_logit_diff']:>13.2e}")


if __name__ == "__main__":
    main()
