"""Configuration validation and fingerprints."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from tiered_kv import ConfigError, DiskConfig, KvBlockManagerConfig, LayoutConfig, ModelConfig

M = ModelConfig(num_layers=2, inner_dim=8)


def test_block_size_bytes_and_kv_per_token() -> None:
    m = ModelConfig(num_layers=32, inner_dim=1024, page_size=16, outer_dim=2, dtype="float16")
    assert m.block_size_bytes == 32 * 2 * 16 * 1024 * 2 == 2 * 1024 * 1024
    assert m.kv_size_per_token == 32 * 2 * 1024 * 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_layers": 0, "inner_dim": 8}, "num_layers"),
        ({"num_layers": 2, "inner_dim": -1}, "inner_dim"),
        ({"num_layers": 2, "inner_dim": 8, "page_size": 0}, "page_size"),
        ({"num_layers": 2, "inner_dim": 8, "page_size": 1.5}, "page_size"),
        ({"num_layers": True, "inner_dim": 8}, "num_layers"),
        ({"num_layers": 2, "inner_dim": 8, "dtype": "float64"}, "dtype"),
    ],
)
def test_model_config_errors_name_field_and_value(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    assert err.value.field == field
    assert field in str(err.value) and repr(err.value.value) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_frozen_and_keyword_only() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        M.num_layers = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        ModelConfig(2, 8)  # type: ignore[misc]


def test_fingerprint_changes_with_every_field_and_is_stable_across_processes() -> None:
    base = ModelConfig(num_layers=2, inner_dim=8, page_size=16, outer_dim=2, dtype="float16")
    variants = [
        dataclasses.replace(base, num_layers=3),
        dataclasses.replace(base, inner_dim=16),
        dataclasses.replace(base, page_size=32),
        dataclasses.replace(base, outer_dim=1),
        dataclasses.replace(base, dtype="bfloat16"),
    ]
    fps = {base.fingerprint(), *(v.fingerprint() for v in variants)}
    assert len(fps) == 6
    code = (
        "from tiered_kv import ModelConfig; "
        "print(ModelConfig(num_layers=2, inner_dim=8, page_size=16).fingerprint())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert out == base.fingerprint()


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: LayoutConfig(num_blocks=0), "num_blocks"),
        (lambda: LayoutConfig(num_blocks=4, layout="paged"), "layout"),
        (lambda: DiskConfig(path="", num_blocks=4), "path"),
        (lambda: DiskConfig(path="/tmp/x", num_blocks=4, backend="nfs"), "backend"),
        (lambda: DiskConfig(path="/tmp/x", num_blocks=4, durability="maybe"), "durability"),
        (lambda: KvBlockManagerConfig(model=M), "device"),
        (lambda: KvBlockManagerConfig(model="m", device=LayoutConfig(num_blocks=1)), "model"),  # type: ignore[arg-type]
        (lambda: KvBlockManagerConfig(model=M, device=LayoutConfig(num_blocks=1), eviction="fifo"), "eviction"),
        (lambda: KvBlockManagerConfig(model=M, device=LayoutConfig(num_blocks=1), hash_algorithm="md5"),
         "hash_algorithm"),
        (lambda: KvBlockManagerConfig(model=M, device=LayoutConfig(num_blocks=1), namespace=""), "namespace"),
        (lambda: KvBlockManagerConfig(model=M, device=LayoutConfig(num_blocks=1), device_type="tpu"), "device_type"),
        (lambda: KvBlockManagerConfig(model=M, device=4), "device"),  # type: ignore[arg-type]
    ],
)
def test_config_errors(factory, field: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as err:
        factory()
    assert err.value.field == field
