"""Conformance tests for the remote tier's store (:class:`~tiered_kv.storage.remote.RemoteStore`) on a live Redis.

Given a reachable Redis (one server, or a cluster's seed nodes), the suite checks against a dict ``hash -> bytes``
it keeps itself: every dtype moves bit for bit (float8 included); gets into a caller's tensor; misses, deletes,
overwrites (last write wins) and ``exists``; empty calls; many blocks over many pipelined chunks; two stores on
the same namespace share blocks, while another namespace or another model never sees them; bad arguments and a
closed store raise ``RemoteTierError``; and random put/get/delete/exists sequences (Hypothesis). Every test works
in a namespace of its own, so a shared server is enough.

Run it against your deployment::

    from tiered_kv.testing import RemoteStoreTests

    class TestMyRedis(RemoteStoreTests):
        @pytest.fixture
        def remote_url(self) -> str | list[str]:
            return "redis://10.0.0.5:6379"             # or a list of cluster seed nodes

Needs pytest, hypothesis and redis-py (``pip install tiered_kv[testing,remote]``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from ..config import ModelConfig
from ..storage.remote import RemoteStore, RemoteTierError
from ._data import DTYPES, SMALL_MODEL, blocks_for, hashes, same

__all__ = ["RemoteStoreTests"]

ALGO = "sha256"


class RemoteStoreTests:
    """Conformance tests for a remote store; subclass and provide the ``remote_url`` fixture.

    See the module docstring.
    """

    #: Socket timeout of the stores the suite opens (seconds).
    timeout: ClassVar[float] = 2.0
    #: Hypothesis examples of the random-operations test.
    max_examples: ClassVar[int] = 10

    @pytest.fixture
    def remote_url(self) -> str | list[str]:
        """``redis://host:port`` of one server, or a list of Redis Cluster seed nodes."""
        raise NotImplementedError(f"{type(self).__name__} must provide a remote_url fixture")

    def make_store(
        self, url: str | list[str], model: ModelConfig, namespace: str, **options: Any
    ) -> RemoteStore:
        """Open the store under test (override to pass credentials, TLS, a cluster flag...)."""
        options.setdefault("timeout", self.timeout)
        return RemoteStore(url, model=model, namespace=namespace, hash_algorithm=ALGO, **options)

    @pytest.fixture
    def namespace(self) -> str:
        """A namespace no other test (or earlier run) uses."""
        return f"conformance-{uuid.uuid4().hex}"

    @pytest.fixture
    def store(self, remote_url: str | list[str], namespace: str) -> Iterator[RemoteStore]:
        s = self.make_store(remote_url, SMALL_MODEL, namespace)
        try:
            yield s
        finally:
            s.close()

    @staticmethod
    def check_against(store: RemoteStore, model: dict[bytes, bytes], asked: Sequence[bytes]) -> None:
        """``get_blocks(asked)`` agrees with the model: present hashes verified with their bytes, others missed."""
        out, ok = store.get_blocks(list(asked))
        assert ok == [h in model for h in asked], "hits and misses differ from what was stored"
        for i, h in enumerate(asked):
            if h in model:
                want = blocks_for([model[h]], store.model)[0]
                assert same(out[i], want), f"block {h.hex()[:12]} came back with other bytes"
        assert store.exists(list(asked)) == [h in model for h in asked]

    # -- round trips -----------------------------------------------------------------------------------------------
    @pytest.mark.parametrize("dtype", [*DTYPES, "uint8"])
    def test_round_trip_every_dtype(self, remote_url: str | list[str], namespace: str, dtype: str) -> None:
        model = ModelConfig(num_layers=3, inner_dim=64, page_size=8, dtype=dtype)
        hs = hashes(f"dtype-{dtype}", 24)
        data = blocks_for(hs, model)
        with self.make_store(remote_url, model, namespace) as store:
            assert store.put_blocks(hs, data) == len(hs)
            out, ok = store.get_blocks(hs)
            assert ok == [True] * len(hs)
            assert out.dtype == model.torch_dtype and tuple(out.shape) == (len(hs), *model.block_shape)
            assert same(out, data)
            m = store.metrics()
            assert (m["puts"], m["hits"], m["misses"], m["corrupt"]) == (len(hs), len(hs), 0, 0)

    def test_get_into_callers_tensor(self, store: RemoteStore) -> None:
        hs = hashes("out", 6)
        store.put_blocks(hs, blocks_for(hs, SMALL_MODEL))
        dest = torch.zeros((3, *SMALL_MODEL.block_shape), dtype=SMALL_MODEL.torch_dtype)
        got, ok = store.get_blocks(hs[::2], out=dest)
        assert got is dest and ok == [True] * 3
        assert same(dest, blocks_for(hs[::2], SMALL_MODEL))

    def test_miss_delete_overwrite_exists(self, store: RemoteStore) -> None:
        hs = hashes("mdo", 8)
        model: dict[bytes, bytes] = {}
        assert store.put_blocks(hs[:5], blocks_for(hs[:5], SMALL_MODEL)) == 5
        model.update((h, h) for h in hs[:5])
        self.check_against(store, model, hs)
        store.delete([hs[0], hs[1], hs[7]])  # hs[7] was never stored: ignored
        del model[hs[0]], model[hs[1]]
        self.check_against(store, model, hs)
        # Overwrite: hs[2] now holds hs[6]'s bytes (last write wins).
        assert store.put_blocks([hs[2]], blocks_for([hs[6]], SMALL_MODEL)) == 1
        model[hs[2]] = hs[6]
        self.check_against(store, model, hs)

    def test_empty_calls(self, store: RemoteStore) -> None:
        assert store.get_blocks([])[1] == []
        assert store.put_blocks([], blocks_for([], SMALL_MODEL)) == 0
        assert store.exists([]) == []
        store.delete([])

    def test_many_blocks_many_chunks(self, remote_url: str | list[str], namespace: str) -> None:
        hs = hashes("chunks", 150)
        data = blocks_for(hs, SMALL_MODEL)
        with self.make_store(remote_url, SMALL_MODEL, namespace, max_batch=8) as store:
            assert store.put_blocks(hs, data) == 150
            out, ok = store.get_blocks(hs[::-1])
            assert all(ok) and same(out, data.flip(0))

    # -- sharing and isolation -------------------------------------------------------------------------------------
    def test_two_stores_share_one_namespace(self, remote_url: str | list[str], namespace: str) -> None:
        hs = hashes("share", 4)
        with self.make_store(remote_url, SMALL_MODEL, namespace) as a, \
                self.make_store(remote_url, SMALL_MODEL, namespace) as b:
            a.put_blocks(hs, blocks_for(hs, SMALL_MODEL))
            self.check_against(b, {h: h for h in hs}, hs)

    def test_other_namespace_and_model_see_nothing(self, remote_url: str | list[str], namespace: str) -> None:
        hs = hashes("iso", 4)
        # Same block size, another fingerprint: the header and key both keep them apart.
        other_model = ModelConfig(num_layers=2, inner_dim=64, page_size=16, dtype="bfloat16")
        assert other_model.block_size_bytes == SMALL_MODEL.block_size_bytes
        with self.make_store(remote_url, SMALL_MODEL, namespace) as store:
            store.put_blocks(hs, blocks_for(hs, SMALL_MODEL))
            with self.make_store(remote_url, SMALL_MODEL, namespace + "-other") as other_ns:
                self.check_against(other_ns, {}, hs)
            with self.make_store(remote_url, other_model, namespace) as other_model_store:
                assert other_model_store.get_blocks(hs)[1] == [False] * 4
                assert other_model_store.exists(hs) == [False] * 4

    # -- errors ----------------------------------------------------------------------------------------------------
    def test_bad_arguments_and_closed_store_raise(self, remote_url: str | list[str], namespace: str) -> None:
        store = self.make_store(remote_url, SMALL_MODEL, namespace)
        hs = hashes("bad", 2)
        with pytest.raises(RemoteTierError):
            store.get_blocks([b"short"])
        with pytest.raises(RemoteTierError):
            store.put_blocks(hs, blocks_for(hs[:1], SMALL_MODEL))  # one block for two hashes
        with pytest.raises(RemoteTierError):
            store.put_blocks(hs, blocks_for(hs, SMALL_MODEL).float())  # wrong dtype
        assert store.get_blocks(hs)[1] == [False, False]  # nothing was written by the refused calls
        store.close()
        store.close()  # idempotent
        for call in (lambda: store.get_blocks(hs), lambda: store.put_blocks(hs, blocks_for(hs, SMALL_MODEL))):
            with pytest.raises(RemoteTierError):
                call()

    # -- random operations -----------------------------------------------------------------------------------------
    def test_random_operations_against_model(self, remote_url: str | list[str]) -> None:
        """Hypothesis: put (with any of several contents), get, delete and exists against a dict model."""
        keys = hashes("random", 8)
        idx = st.lists(st.integers(0, len(keys) - 1), min_size=1, max_size=5, unique=True)
        op = st.one_of(
            st.tuples(st.just("put"), idx, st.integers(0, 2)),
            st.tuples(st.just("get"), idx, st.just(0)),
            st.tuples(st.just("delete"), idx, st.just(0)),
        )

        @settings(max_examples=self.max_examples, deadline=None, report_multiple_bugs=False)
        @given(ops=st.lists(op, min_size=3, max_size=15))
        def run(ops: list[tuple[str, list[int], int]]) -> None:
            model: dict[bytes, bytes] = {}  # hash -> the key its bytes are derived from
            with self.make_store(remote_url, SMALL_MODEL, f"conformance-{uuid.uuid4().hex}") as store:
                for kind, which, version in ops:
                    hs = [keys[i] for i in which]
                    if kind == "put":
                        contents = [h + bytes([version]) for h in hs]
                        assert store.put_blocks(hs, blocks_for(contents, SMALL_MODEL)) == len(hs)
                        model.update(zip(hs, contents))
                    elif kind == "delete":
                        store.delete(hs)
                        for h in hs:
                            model.pop(h, None)
                    else:
                        self.check_against(store, model, hs)
                self.check_against(store, model, keys)

        run()
