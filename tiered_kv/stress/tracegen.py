"""A small synthetic trace generator writing the Mooncake JSONL format (see :mod:`tiered_kv.stress.replay`).

Requests arrive as a Poisson process. Most are turns of multi-turn conversations (Zipf over conversations): a turn's
prompt is a shared system prompt, then every earlier turn of its conversation, so its ``hash_ids`` extend the
previous turn's. The rest are one-time documents with fresh ids. Ids are remapped in order of first appearance,
like the public traces.
"""

from __future__ import annotations

import bisect
import json
import os
import random
from typing import IO

__all__ = ["generate_trace"]


def generate_trace(
    out: str | os.PathLike[str] | IO[str],
    requests: int,
    *,
    seed: int = 0,
    conversations: int = 500,
    system_prompts: int = 8,
    system_ids: int = 4,
    turn_ids: int = 2,
    max_ids: int = 64,
    document_rate: float = 0.1,
    document_ids: int = 16,
    rate_per_s: float = 5.0,
    block_tokens: int = 512,
) -> int:
    """Write ``requests`` lines of a synthetic trace to ``out`` (a path or a text stream); returns the line count.

    Args:
        requests: number of requests.
        seed: seed of every random choice (same seed, same trace).
        conversations: distinct conversations (picked with a Zipf law of exponent 1).
        system_prompts: distinct shared system prompts (``system_ids`` blocks each).
        turn_ids: blocks a turn adds to its conversation; a conversation restarts after ``max_ids`` blocks.
        document_rate: fraction of requests that are one-time documents of ``document_ids`` blocks.
        rate_per_s: mean arrival rate (the ``timestamp`` field is in milliseconds).
        block_tokens: tokens per hash id.
    """
    if requests < 0:
        raise ValueError(f"requests must be >= 0, got {requests}")
    rng = random.Random(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    systems = [fresh(system_ids) for _ in range(system_prompts)]
    contexts: dict[int, list[int]] = {}
    weights = [1.0 / (r + 1) for r in range(conversations)]
    cdf: list[float] = []
    acc = 0.0
    for w in weights:
        acc += w / sum(weights)
        cdf.append(acc)
    close = False
    if isinstance(out, (str, os.PathLike)):
        stream: IO[str] = open(out, "w", encoding="utf-8")  # noqa: SIM115
        close = True
    else:
        stream = out
    try:
        t_ms = 0.0
        for _ in range(requests):
            t_ms += rng.expovariate(rate_per_s) * 1000.0
            if rng.random() < document_rate:
                ids = fresh(document_ids)
            else:
                c = min(bisect.bisect_left(cdf, rng.random()), conversations - 1)
                ctx = contexts.get(c)
                if ctx is None or len(ctx) + turn_ids > max_ids:
                    ctx = list(systems[c % system_prompts])
                ctx = ctx + fresh(turn_ids)
                contexts[c] = ctx
                ids = ctx
            length = len(ids) * block_tokens - rng.randrange(block_tokens)
            doc = {"timestamp": int(t_ms), "input_length": length, "output_length": rng.randrange(16, 800),
                   "hash_ids": ids}
            stream.write(json.dumps(doc) + "\n")
    finally:
        if close:
            stream.close()
    return requests
