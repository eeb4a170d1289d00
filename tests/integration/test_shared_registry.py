"""Two machines that share nothing but a real `mlflow server`: home A trains and promotes,
home B (an empty store) resolves the champion, fetches it from the server's artifact store
and opens it with its checks; a rollback from A is what B sees next. Each side runs in a
process of its own, as a machine would (BentoML reads BENTOML_HOME once per process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT, ServerProcess

SMALL = ["--n-users", "600", "--n-items", "400", "--n-interactions", "30000", "--tune-budget", "0"]
NAME = "shared-reg"

MACHINE_B = """
import json, sys
from models.lifecycle import registry, store
tag = registry.resolve_alias(sys.argv[1], "champion")
registry.ensure_local(tag)
version = store.open_version(tag)
print(json.dumps({"tag": tag, "path": str(version.path)}))
"""


def on(home: Path, server: ServerProcess, args: list[str]) -> dict:
    """Run `args` (after the interpreter) as a machine whose store is `home`; its JSON line."""
    env = {"PATH": "/usr/bin:/bin", "BENTOML_HOME": str(home), "MLFLOW_TRACKING_URI": server.url,
           "BENTOML_DO_NOT_TRACK": "true"}  # fmt: skip
    done = subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_a_promotion_and_a_rollback_reach_a_machine_that_lacks_the_versions(
    mlflow_server: ServerProcess, tmp_path: Path
) -> None:
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    train = ["-m", "training", *SMALL, "--model-name", NAME, "--json"]
    first = on(home_a, mlflow_server, train)
    second = on(home_a, mlflow_server, [*train, "--seed", "8", "--promote"])
    assert (first["champion"], second["champion"]) == (first["tag"], second["tag"])
    assert not (home_b / "models").exists()

    fetched = on(home_b, mlflow_server, ["-c", MACHINE_B, NAME])
    assert fetched["tag"] == second["tag"] and Path(fetched["path"]).is_relative_to(home_b)

    rolled = on(home_a, mlflow_server, ["-m", "training", "models", "rollback", "--name", NAME, "--json"])
    assert rolled["champion"] == first["tag"]
    fetched = on(home_b, mlflow_server, ["-c", MACHINE_B, NAME])
    assert fetched["tag"] == first["tag"] and Path(fetched["path"]).is_relative_to(home_b)
    shown = on(tmp_path / "c", mlflow_server, ["-m", "training", "models", "show", "champion", "--name", NAME, "--json"])
    assert (shown["tag"], shown["stage"]) == (first["tag"], "champion")  # a third machine's CLI fetches it
    assert not list(tmp_path.glob("*/mlflow.db"))  # the registry is the server's only
