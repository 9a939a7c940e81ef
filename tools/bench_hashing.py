"""Benchmark tiered_kv.hashing.compute_sequence_hashes against a naive chained-pickle implementation.

The baseline is what a first implementation usually looks like and is measured in the same run::

    parent = hashlib.sha256(pickle.dumps((parent, tuple(tokens[i:i + bs]), extra))).digest()

Usage::

    python tools/bench_hashing.py                  # table
    python tools/bench_hashing.py --json           # JSON
    python tools/bench_hashing.py --tokens 131072 --block-size 16 --repeat 25
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tiered_kv.hashing import compute_sequence_hashes


def naive_hashes(tokens: list[int], block_size: int) -> list[bytes]:
    """The baseline: chained SHA-256 over a pickled (parent, block tokens, extra) tuple per block."""
    parent = b""
    out = []
    for i in range(0, len(tokens) - len(tokens) % block_size, block_size):
        parent = hashlib.sha256(pickle.dumps((parent, tuple(tokens[i : i + block_size]), None))).digest()
        out.append(parent)
    return out


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls, in seconds (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(n_tokens: int, block_size: int, repeat: int, vocab: int, seed: int) -> dict[str, Any]:
    """Time every (algorithm, input form) pair and the baseline; return the figures."""
    rng = random.Random(seed)
    tokens = [rng.randrange(vocab) for _ in range(n_tokens)]
    forms: dict[str, Any] = {
        "list": tokens,
        "numpy int64": np.array(tokens, dtype=np.int64),
        "torch int64": torch.tensor(tokens, dtype=torch.int64),
    }
    naive_s = best_of(lambda: naive_hashes(tokens, block_size), repeat)
    rows = [
        {
            "impl": "naive sha256+pickle",
            "input": "list",
            "seconds": naive_s,
            "tokens_per_s": n_tokens / naive_s,
            "speedup": 1.0,
        }
    ]
    for algorithm in ("sha256", "xxh3_128"):
        expected = compute_sequence_hashes(tokens, block_size, algorithm=algorithm)
        for name, form in forms.items():
            assert compute_sequence_hashes(form, block_size, algorithm=algorithm) == expected, name

            def call(form: Any = form, algorithm: str = algorithm) -> object:
                return compute_sequence_hashes(form, block_size, algorithm=algorithm)

            s = best_of(call, repeat)
            rows.append(
                {
                    "impl": f"tiered_kv {algorithm}",
                    "input": name,
                    "seconds": s,
                    "tokens_per_s": n_tokens / s,
                    "speedup": naive_s / s,
                }
            )
    return {
        "tokens": n_tokens,
        "block_size": block_size,
        "blocks": n_tokens // block_size,
        "repeat": repeat,
        "python": sys.version.split()[0],
        "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    """Print the figures as an aligned text table."""
    print(
        f"{result['tokens']} tokens, block_size {result['block_size']} ({result['blocks']} blocks), "
        f"best of {result['repeat']}, Python {result['python']}"
    )
    header = f"{'implementation':<22} {'input':<12} {'ms':>9} {'Mtokens/s':>10} {'vs naive':>9}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(
            f"{r['impl']:<22} {r['input']:<12} {r['seconds'] * 1e3:>9.3f} "
            f"{r['tokens_per_s'] / 1e6:>10.1f} {r['speedup']:>8.1f}x"
        )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128 * 1024, help="tokens per sequence (default 131072)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    parser.add_argument("--repeat", type=int, default=25, help="timed runs per case; the best counts (default 25)")
    parser.add_argument("--vocab", type=int, default=152064, help="token ids are drawn from [0, vocab)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    result = run(args.tokens, args.block_size, args.repeat, args.vocab, args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
