"""Fuzzing from the service's own OpenAPI document with schemathesis (all checks): no 5xx,
every response as documented (400 bodies name the field and rule), schema-valid requests
accepted and invalid ones rejected. CI runs a few hundred cases; `--fuzz-examples N` more."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT, ServerProcess

pytestmark = pytest.mark.e2e


def test_schemathesis_finds_nothing(server: ServerProcess, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    examples = int(request.config.getoption("--fuzz-examples"))
    st = Path(sys.executable).parent / "schemathesis"
    out = subprocess.run(
        [str(st), "run", f"{server.url}/docs.json", "--checks", "all", "--max-examples", str(examples),
         "--seed", "20261125", "--no-color"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    (tmp_path / "schemathesis.log").write_text(out.stdout + out.stderr)
    generated = re.search(r"(\d+) generated", out.stdout)
    assert generated, out.stdout[-3000:]
    print(f"\nschemathesis: {generated.group(0)} cases")
    assert out.returncode == 0, out.stdout[-6000:]
    assert int(generated.group(1)) >= 3 * examples
    selected = re.search(r"Selected: (\d+)/(\d+)", out.stdout)
    tested = re.search(r"Tested: (\d+)", out.stdout)
    assert selected and tested and int(tested.group(1)) == int(selected.group(2)) >= 5  # every operation
