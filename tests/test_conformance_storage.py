"""``tiered_kv.testing.BlockStorageTests`` on every built-in block storage: the host arena in both layouts, the disk
tier (buffered and O_DIRECT), and the device arena on CUDA machines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiered_kv.config import DiskConfig, ModelConfig
from tiered_kv.storage.base import BlockStorage
from tiered_kv.storage.disk import DiskStore, PosixBackend, probe_direct_io
from tiered_kv.storage.disk_tier import DiskStorage
from tiered_kv.storage.memory import TensorArena
from tiered_kv.testing import BlockStorageTests
from tiered_kv.testing._data import SMALL_MODEL


class TestHostArenaFullyContiguous(BlockStorageTests):
    def make_storage(self, model: ModelConfig, num_blocks: int, path: Path) -> BlockStorage:
        return TensorArena("host", model, num_blocks, "fully_contiguous", "cpu")


class TestHostArenaLayerSeparate(BlockStorageTests):
    def make_storage(self, model: ModelConfig, num_blocks: int, path: Path) -> BlockStorage:
        return TensorArena("host", model, num_blocks, "layer_separate", "cpu")


class TestDiskStorage(BlockStorageTests):
    direct = False

    def make_storage(self, model: ModelConfig, num_blocks: int, path: Path) -> BlockStorage:
        cfg = DiskConfig(path=str(path), num_blocks=num_blocks, backend="posix", durability="none")
        return DiskStorage(DiskStore(cfg, model, hash_algorithm="sha256", namespace="conformance",
                                     backend=PosixBackend(direct=self.direct)))

    def reopen_storage(self, model: ModelConfig, num_blocks: int, path: Path) -> BlockStorage | None:
        return self.make_storage(model, num_blocks, path)


class TestDiskStorageDirect(TestDiskStorage):
    direct = True
    max_examples = 6  # O_DIRECT I/O: fewer random runs

    @pytest.fixture(autouse=True)
    def _needs_direct(self, tmp_path: Path) -> None:
        if not probe_direct_io(tmp_path):
            pytest.skip("this filesystem refuses O_DIRECT")


@pytest.mark.gpu
class TestDeviceArenaCuda(BlockStorageTests):
    @pytest.fixture(autouse=True)
    def _needs_cuda(self) -> None:
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")

    def make_storage(self, model: ModelConfig, num_blocks: int, path: Path) -> BlockStorage:
        return TensorArena("device", model, num_blocks, "fully_contiguous", "cuda")


class _SkipsLastBlockOfScatter(TensorArena):
    """A broken arena: a scatter of several blocks leaves the last one unwritten."""

    def scatter(self, slots: list[int], data: torch.Tensor) -> None:  # type: ignore[override]
        self.check_batch(len(slots), data)
        keep = max(1, len(slots) - 1)
        super().scatter(slots[:keep], data[:keep])


class _ReadViewAliases(TensorArena):
    """A broken arena: read views alias the slot, so a caller's write changes registered data."""

    def read_view(self, slot: int, layer: int, outer: int) -> torch.Tensor:
        return self.mutable_view(slot, layer, outer)


class _BrokenSuite(BlockStorageTests):
    broken: type[TensorArena] = TensorArena

    def make_storage(self, model: ModelConfig, num_blocks: int, path: Path) -> BlockStorage:
        return self.broken("host", model, num_blocks, "fully_contiguous", "cpu")


@pytest.mark.parametrize(
    ("broken", "test", "args"),
    [
        (_SkipsLastBlockOfScatter, "test_write_commit_read_every_way", {"how": "scatter"}),
        (_ReadViewAliases, "test_read_view_is_not_a_way_to_write", {}),
    ],
)
def test_suite_catches_broken_storages(broken: type[TensorArena], test: str, args: dict[str, str]) -> None:
    suite = _BrokenSuite()
    suite.broken = broken
    storage = suite.make_storage(SMALL_MODEL, suite.num_blocks, Path("unused"))
    with pytest.raises(AssertionError):
        getattr(suite, test)(storage=storage, **args)
