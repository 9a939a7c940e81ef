"""Remote block access by descriptor (seed 004's ``get_remote_blocks_immutable`` / ``get_remote_blocks_mutable``).

A worker *publishes* blocks it holds: their bytes go to the shared remote tier (Redis) and it hands out
:class:`BlockDescriptor` values (worker id, sequence hash, model fingerprint, namespace), which travel to a peer as
bytes (:meth:`BlockDescriptor.pack_many`). The peer resolves them through the same remote tier:

* ``get_remote_blocks_immutable(descriptors)``: read-only handles holding the verified bytes, taking no local slot;
* ``get_remote_blocks_mutable(descriptors)``: blocks of the peer's top tier, allocated and filled with those bytes,
  to modify and register as its own.

Bytes are checksum-verified like any remote read; a descriptor whose block the remote tier does not hold (never
published, evicted by Redis, unreachable) is refused with its index, and nothing is returned or allocated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgpack
import torch

from .blocks import ImmutableBlock, MutableBlock
from .errors import ConfigError, InvalidBlockError, LayoutMismatchError
from .offload import SnapshotBlock

if TYPE_CHECKING:
    from .manager import KvBlockManager
    from .remote import RemoteTier

__all__ = ["BlockDescriptor", "fetch_remote_blocks", "publish_blocks"]


@dataclass(frozen=True, slots=True)
class BlockDescriptor:
    """Where a peer can find one published block: in the shared remote tier, under its sequence hash."""

    worker_id: str
    sequence_hash: bytes
    fingerprint: str
    namespace: str

    @staticmethod
    def pack_many(descriptors: Sequence[BlockDescriptor]) -> bytes:
        """Serialise descriptors (msgpack) to send to a peer."""
        return msgpack.packb(
            [[d.worker_id, d.sequence_hash, d.fingerprint, d.namespace] for d in descriptors], use_bin_type=True
        )

    @staticmethod
    def unpack_many(data: bytes) -> list[BlockDescriptor]:
        """The descriptors :meth:`pack_many` wrote.

        Raises:
            ValueError: ``data`` is not a packed descriptor list.
        """
        try:
            rows = msgpack.unpackb(data, raw=False)
            return [BlockDescriptor(str(w), bytes(h), str(f), str(n)) for w, h, f, n in rows]
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise ValueError(f"data: not a packed BlockDescriptor list ({exc})") from exc


def _remote(bm: KvBlockManager) -> RemoteTier:
    remote = bm._remote
    if remote is None:
        raise ConfigError("remote", None, "remote block access needs a remote tier (KvBlockManagerConfig.remote)")
    return remote


def publish_blocks(bm: KvBlockManager, blocks: Sequence[ImmutableBlock | bytes]) -> list[BlockDescriptor]:
    """Write blocks this manager holds (handles, or hashes registered in any local tier) to the remote tier now
    and return their descriptors.

    Raises:
        ConfigError: no remote tier. InvalidBlockError: a hash no local tier holds, or a released handle.
        BlockPoolError: the remote tier did not take every block (unreachable, full); see its metrics.
    """
    from .errors import BlockPoolError

    remote = _remote(bm)
    hashes: list[bytes] = []
    for i, b in enumerate(blocks):
        if isinstance(b, ImmutableBlock):
            if b.released:
                raise InvalidBlockError(f"blocks[{i}]: {b!r} is released")
            hashes.append(b.sequence_hash)
        elif isinstance(b, (bytes, bytearray)):
            hashes.append(bytes(b))
        else:
            got = type(b).__name__
            raise InvalidBlockError(f"blocks[{i}]: expected an ImmutableBlock or a sequence hash, got {got}")
    hashes = bm.top.validate_hashes(hashes, "blocks")
    todo: dict[int, tuple[list[int], list[ImmutableBlock]]] = {}
    found = [False] * len(hashes)
    for pool in bm.pools():  # the highest tier holding each hash (no promotion: a publish is a read)
        want = [i for i, h in enumerate(hashes) if not found[i] and h in pool]
        held = pool.acquire([hashes[i] for i in want])
        got = {b.sequence_hash: b for b in held}
        idx = [i for i in want if hashes[i] in got]
        for i in idx:
            found[i] = True
        if idx:
            todo[id(pool)] = (idx, [got[hashes[i]] for i in idx])
    missing = [i for i, f in enumerate(found) if not f]
    try:
        if missing:
            raise InvalidBlockError(f"blocks[{missing[0]}]: {hashes[missing[0]].hex()} is not held by any local tier")
        data = torch.empty((len(hashes), *bm.model.block_shape), dtype=bm.model.torch_dtype)
        for pool in bm.pools():
            entry = todo.get(id(pool))
            if entry is None:
                continue
            idx, handles = entry
            part, bad = pool.gather(handles)
            if bad:
                raise InvalidBlockError(f"blocks[{idx[bad[0]]}]: failed verification in the {pool.tier} tier")
            data[torch.tensor(idx)] = part.to("cpu")
        written = remote.store.put_blocks(hashes, data)
    finally:
        for pool in bm.pools():
            entry = todo.get(id(pool))
            if entry is not None:
                pool.release_blocks(entry[1])
    if written != len(hashes):
        raise BlockPoolError(f"the remote tier took {written} of {len(hashes)} blocks; nothing is guaranteed published")
    remote._remember(hashes)
    fingerprint, namespace = bm.model.fingerprint(), bm.config.namespace
    return [BlockDescriptor(bm.worker_id, h, fingerprint, namespace) for h in hashes]


def fetch_remote_blocks(bm: KvBlockManager, descriptors: Sequence[BlockDescriptor]) -> tuple[list[bytes], torch.Tensor]:
    """Read and verify the blocks of ``descriptors`` from the remote tier: (hashes, data); all or nothing.

    Raises:
        ConfigError: no remote tier. LayoutMismatchError: a descriptor of another model or namespace.
        InvalidBlockError: a descriptor whose block the remote tier does not hold (or failed verification).
    """
    remote = _remote(bm)
    ours = (bm.model.fingerprint(), bm.config.namespace)
    for i, d in enumerate(descriptors):
        if not isinstance(d, BlockDescriptor):
            raise InvalidBlockError(f"descriptors[{i}]: expected a BlockDescriptor, got {type(d).__name__}")
        if (d.fingerprint, d.namespace) != ours:
            raise LayoutMismatchError(
                f"descriptors[{i}] (worker {d.worker_id}) is for (fingerprint, namespace) "
                f"{(d.fingerprint, d.namespace)}, this manager serves {ours}"
            )
    hashes = bm.top.validate_hashes([d.sequence_hash for d in descriptors], "descriptors")
    if not hashes:
        return [], torch.empty((0, *bm.model.block_shape), dtype=bm.model.torch_dtype)
    data, ok = remote.store.get_blocks(hashes)
    bad = [i for i, good in enumerate(ok) if not good]
    if bad:
        d = descriptors[bad[0]]
        raise InvalidBlockError(
            f"descriptors[{bad[0]}]: block {d.sequence_hash.hex()} of worker {d.worker_id} is not in the remote tier "
            f"({len(bad)} of {len(hashes)} unavailable); nothing was fetched"
        )
    remote._remember(hashes)
    return hashes, data


def remote_blocks_immutable(bm: KvBlockManager, descriptors: Sequence[BlockDescriptor]) -> list[SnapshotBlock]:
    """Read-only handles of the descriptors' blocks (see the module docstring)."""
    remote = _remote(bm)
    hashes, data = fetch_remote_blocks(bm, descriptors)
    return [SnapshotBlock(remote, h, data[i], None) for i, h in enumerate(hashes)]


def remote_blocks_mutable(bm: KvBlockManager, descriptors: Sequence[BlockDescriptor]) -> list[MutableBlock]:
    """Top-tier blocks filled with the descriptors' bytes (see the module docstring).

    Raises:
        NotEnoughBlocksAvailable: the top tier cannot hold them all (nothing is allocated).
    """
    _hashes, data = fetch_remote_blocks(bm, descriptors)
    top = bm.top
    blocks = top.allocate_blocks(len(descriptors))
    try:
        top.scatter(blocks, data.to(top.storage.device))
    except BaseException:
        top.release_blocks(blocks)
        raise
    return blocks
