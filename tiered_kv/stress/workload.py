"""The stress workload: conversations that share long prefixes, replayed by many clients.

Shape (every knob is a :class:`WorkloadShape` field):

* ``system_prompts`` long system prompts; every conversation starts with one of them, so many conversations
  share a long prefix;
* ``conversations`` conversations picked with a Zipf law (a few hot ones, a long tail); each request of a
  conversation is its whole context so far (system prompt + every earlier turn), so contexts grow turn by
  turn until ``max_context_blocks``, after which the conversation starts over as a new session;
* with probability ``document_rate`` a request is instead a one-time long document that nobody asks for again
  (it pollutes the cache and pushes the hot prefixes down the tiers).

Token ids are a pure function of (seed, system prompt, session), so a restarted process (after a kill) replays
the same prefixes and finds them on disk. Each client thread owns a :class:`ConversationWorkload` view with its
own random generator; the sessions' turn counters are shared (under a lock) so that clients continue each
other's conversations, as the replicas of a serving engine would.
"""

from __future__ import annotations

import bisect
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["WorkloadShape", "Request", "ConversationWorkload", "RequestStream"]

#: Hashes the full blocks of a list of token ids (the manager's ``sequence_hashes``).
Hasher = Callable[[Sequence[int]], list[bytes]]


@dataclass(frozen=True, kw_only=True)
class WorkloadShape:
    """Parameters of the synthetic conversation workload (block counts are in pages of the store)."""

    conversations: int = 200
    zipf: float = 1.1
    system_prompts: int = 4
    system_blocks: int = 8
    turn_blocks: int = 2
    max_context_blocks: int = 24
    document_rate: float = 0.05
    document_blocks: int = 16

    def __post_init__(self) -> None:
        for name in ("conversations", "system_prompts", "system_blocks", "turn_blocks", "max_context_blocks",
                     "document_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(name, value, "must be an int > 0")
        if self.max_context_blocks <= self.system_blocks:
            raise ConfigError("max_context_blocks", self.max_context_blocks, "must exceed system_blocks")
        if not 0.0 <= self.document_rate <= 1.0:
            raise ConfigError("document_rate", self.document_rate, "must be in [0, 1]")
        if not self.zipf > 0.0:
            raise ConfigError("zipf", self.zipf, "must be > 0")


@dataclass(frozen=True, slots=True)
class Request:
    """One request: the hashes of its full blocks, and what kind of request it is."""

    hashes: list[bytes]
    kind: str  # "turn" | "document"
    conversation: int


class _Sessions:
    """Shared turn counters and cached hash chains of every conversation's current session."""

    def __init__(self, shape: WorkloadShape, seed: int, page_size: int, hasher: Hasher) -> None:
        self.shape = shape
        self.seed = seed
        self.page_size = page_size
        self.hasher = hasher
        self.lock = threading.Lock()
        self.session = [0] * shape.conversations
        self.turn = [0] * shape.conversations
        self.chains: dict[tuple[int, int], list[bytes]] = {}

    def _tokens(self, conversation: int, session: int) -> list[int]:
        shape, p = self.shape, self.page_size
        system = conversation % shape.system_prompts
        sys_rng = random.Random(f"{self.seed}/system/{system}")
        body_rng = random.Random(f"{self.seed}/conversation/{conversation}/{session}")
        head = [sys_rng.randrange(2**32) for _ in range(shape.system_blocks * p)]
        body = [body_rng.randrange(2**32) for _ in range((shape.max_context_blocks - shape.system_blocks) * p)]
        return head + body

    def next_turn(self, conversation: int) -> list[bytes]:
        """The context of the conversation's next turn (its current session; a new one once it is full)."""
        shape = self.shape
        with self.lock:
            turn = self.turn[conversation] + 1
            length = shape.system_blocks + turn * shape.turn_blocks
            if length > shape.max_context_blocks:
                self.session[conversation] += 1
                self.chains.pop((conversation, self.session[conversation] - 1), None)
                turn, length = 1, shape.system_blocks + shape.turn_blocks
            self.turn[conversation] = turn
            key = (conversation, self.session[conversation])
            chain = self.chains.get(key)
        if chain is None:
            chain = self.hasher(self._tokens(*key))
            with self.lock:
                self.chains[key] = chain
        return chain[: min(length, shape.max_context_blocks)]


class ConversationWorkload:
    """The conversations of one run; each client draws its requests from its own :meth:`stream`.

    Args:
        shape: the workload parameters.
        seed: the run's seed (token ids depend only on it, not on the client).
        page_size: tokens per block.
        hasher: turns token ids into block hashes (``KvBlockManager.sequence_hashes``).
    """

    def __init__(self, shape: WorkloadShape, seed: int, page_size: int, hasher: Hasher) -> None:
        self.shape = shape
        self.sessions = _Sessions(shape, seed, page_size, hasher)
        weights = [1.0 / (rank + 1) ** shape.zipf for rank in range(shape.conversations)]
        total = sum(weights)
        acc = 0.0
        self.cdf: list[float] = []
        for w in weights:
            acc += w / total
            self.cdf.append(acc)

    def stream(self, client: int, life: int = 0) -> RequestStream:
        """The request stream of one client (in one process life, after ``life`` kills)."""
        return RequestStream(self, client, life)


class RequestStream:
    """Requests of one client: Zipf-picked conversation turns, sometimes a one-time document."""

    def __init__(self, workload: ConversationWorkload, client: int, life: int) -> None:
        self.workload = workload
        self.tag = f"{workload.sessions.seed}/{client}/{life}"
        self.rng = random.Random(f"{self.tag}/client")
        self.documents = 0

    def next_request(self) -> Request:
        """The next request of this client."""
        wl = self.workload
        shape = wl.shape
        if self.rng.random() < shape.document_rate:
            self.documents += 1
            doc_rng = random.Random(f"{self.tag}/document/{self.documents}")
            tokens = [doc_rng.randrange(2**32) for _ in range(shape.document_blocks * wl.sessions.page_size)]
            return Request(wl.sessions.hasher(tokens), "document", -1)
        conversation = min(bisect.bisect_left(wl.cdf, self.rng.random()), len(wl.cdf) - 1)
        return Request(wl.sessions.next_turn(conversation), "turn", conversation)
