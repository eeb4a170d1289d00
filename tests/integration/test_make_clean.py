"""`make clean` removes what running the project and its tests leaves behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT

# Folders a test run writes into the project: pytest's, hypothesis's and schemathesis's caches.
LEFT_BEHIND = (".venv", ".pytest_cache", ".hypothesis", ".schemathesis")


@pytest.mark.parametrize("folder", LEFT_BEHIND)
def test_make_clean_removes(tmp_path: Path, folder: str) -> None:
    """Run in a scratch folder (-C), so the real venv and caches stay."""
    (tmp_path / folder / "inner").mkdir(parents=True)
    (tmp_path / folder / "inner" / "file").write_text("x")
    out = subprocess.run(["make", "-C", str(tmp_path), "-f", str(PROJECT_ROOT / "Makefile"), "clean"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / folder).exists(), out.stdout
