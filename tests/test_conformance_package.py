"""``tiered_kv.testing`` as a user meets it: every suite importable, nothing test-only imported by ``tiered_kv``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tiered_kv.testing


def test_every_public_name_imports() -> None:
    for name in tiered_kv.testing.__all__:
        assert getattr(tiered_kv.testing, name) is not None
        assert name in dir(tiered_kv.testing)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_library_import_pulls_in_no_test_tools() -> None:
    res = _run(
        "import sys, tiered_kv, tiered_kv.testing\n"
        "assert 'pytest' not in sys.modules and 'hypothesis' not in sys.modules, sorted(sys.modules)\n"
    )
    assert res.returncode == 0, res.stderr


def test_missing_pytest_is_named_with_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytest", None)  # what an install without the testing extra looks like
    monkeypatch.delitem(sys.modules, "tiered_kv.testing.policies")
    with pytest.raises(ImportError, match=r"pip install 'tiered_kv\[testing\]'"):
        tiered_kv.testing.__getattr__("EvictionPolicyTests")
