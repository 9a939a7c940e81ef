"""WorkQueue: drain() waits for what was queued before it, and a steady stream of new work cannot starve it."""

from __future__ import annotations

import threading

from tiered_kv.workqueue import WorkQueue


class _Jobs:
    """Jobs that each wait on their own gate; ``started[name]`` is set when a worker begins one."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.done: list[str] = []

    def add(self, name: str) -> str:
        self.gates[name] = threading.Event()
        self.started[name] = threading.Event()
        return name

    def handle(self, name: str) -> None:
        self.started[name].set()
        assert self.gates[name].wait(30)
        self.done.append(name)


def _queue(jobs: _Jobs, workers: int = 1) -> WorkQueue[str]:
    return WorkQueue(100, lambda job: 1, jobs.handle, workers, "test-queue")


def test_drain_returns_once_earlier_jobs_finish_even_while_new_ones_run() -> None:
    jobs = _Jobs()
    q = _queue(jobs)
    try:
        for name in ("a", "b"):
            assert q.reserve(1) == 1
            q.put(jobs.add(name))
        assert jobs.started["a"].wait(30)
        drained = threading.Event()
        t = threading.Thread(target=lambda: drained.set() if q.drain(30) else None)
        t.start()
        assert q.reserve(1) == 1
        q.put(jobs.add("c"))  # queued after drain() began: not waited for
        jobs.gates["a"].set()
        assert jobs.started["b"].wait(30)
        assert not drained.is_set()  # b was queued before drain(): still waited for
        jobs.gates["b"].set()
        assert jobs.started["c"].wait(30)  # c runs now, and stays blocked
        t.join(30)
        assert drained.is_set() and jobs.done == ["a", "b"]
    finally:
        for g in jobs.gates.values():
            g.set()
        q.stop(30)


def test_drain_waits_for_busy_sections_started_before_it_only() -> None:
    jobs = _Jobs()
    q = _queue(jobs, workers=0)
    early, late = threading.Event(), threading.Event()
    inside = threading.Barrier(2)

    def section(gate: threading.Event) -> None:
        with q.busy():
            inside.wait(30)
            assert gate.wait(30)

    first = threading.Thread(target=section, args=(early,))
    first.start()
    inside.wait(30)  # the first section runs
    drained = threading.Event()
    t = threading.Thread(target=lambda: drained.set() if q.drain(30) else None)
    t.start()
    inside.reset()
    second = threading.Thread(target=section, args=(late,))
    second.start()
    inside.wait(30)  # a second section started after drain() began
    assert not drained.is_set()
    early.set()
    t.join(30)
    assert drained.is_set()  # the late section still runs
    late.set()
    first.join(30)
    second.join(30)
    assert q.drain(0)


def test_merged_jobs_keep_the_oldest_ticket() -> None:
    done: list[list[str]] = []
    gate = threading.Event()
    started = threading.Event()

    def handle(job: list[str]) -> None:
        started.set()
        assert gate.wait(30)
        done.append(job)

    q: WorkQueue[list[str]] = WorkQueue(
        100, len, handle, 1, "test-merge", merge=lambda a, b: a + b, merge_units=10
    )
    try:
        q.reserve(1)
        q.put(["first"])
        assert started.wait(30)  # the worker holds "first"; the next two queue up behind it
        for name in ("x", "y"):
            q.reserve(1)
            q.put([name])
        gate.set()
        assert q.drain(30)
        assert done == [["first"], ["x", "y"]]  # merged into one job, and waited for
    finally:
        gate.set()
        q.stop(30)
