"""Stress, crash and fault runs of the store, and trace replay (the ``tiered-kv stress`` / ``replay`` commands).

Modules, one role each:

* :mod:`~tiered_kv.stress.options` — what a run does (:class:`StressOptions`) and the store config it implies;
* :mod:`~tiered_kv.stress.workload` — the conversations (Zipf, shared prefixes, growing contexts, documents);
* :mod:`~tiered_kv.stress.content` — block bytes as a function of the hash, written and verified;
* :mod:`~tiered_kv.stress.clients` — the clients (threads and asyncio tasks) and the direct tier checker;
* :mod:`~tiered_kv.stress.durability` — what "durable" and "lost" mean, checkpoints and the reopen check;
* :mod:`~tiered_kv.stress.runner` — one process's run (in-process mode; the child's workload);
* :mod:`~tiered_kv.stress.child` / :mod:`~tiered_kv.stress.crash` — kill mode: the child and its killer;
* :mod:`~tiered_kv.stress.stats` / :mod:`~tiered_kv.stress.report` — counters, latencies, the report;
* :mod:`~tiered_kv.stress.replay` / :mod:`~tiered_kv.stress.tracegen` — trace replay and a trace generator.
"""

from __future__ import annotations

from .options import PLANTED_BUGS, StressOptions
from .replay import ReplayOptions, replay_trace
from .tracegen import generate_trace
from .workload import WorkloadShape

__all__ = ["PLANTED_BUGS", "ReplayOptions", "StressOptions", "WorkloadShape", "generate_trace", "replay_trace"]
