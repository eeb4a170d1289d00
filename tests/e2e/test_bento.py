"""The packaged path: train into a fresh store, `bentoml build`, export the Bento to a file,
import it into another empty BENTOML_HOME and serve it from there; a Bento keeps serving the
model version it was built with even after newer versions are trained."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import pytest

from bench.servers import start_process
from deploy.render import render
from tests.helpers import BENTOML_BIN, PROJECT_ROOT, ServerProcess, free_port, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SMALL = ["--n-users", "400", "--n-items", "300", "--n-interactions", "20000", "--json"]


def run(args: list[str], home: Path, cwd: Path = PROJECT_ROOT, extra_env: dict[str, str] | None = None) -> str:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", **(extra_env or {})}
    env.pop("RECSYS_MODEL_TAG", None)
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def train_default_model(home: Path) -> str:
    import json

    return str(json.loads(run([sys.executable, "-m", "training", *SMALL], home))["tag"])


def build(home: Path, extra_env: dict[str, str] | None = None) -> str:
    out = run([BENTOML_BIN, "build", ".", "--output", "tag"], home, extra_env=extra_env)
    return next(line.split("__tag__:")[1] for line in out.splitlines() if "__tag__:" in line).strip()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str | Path]]:
    root = tmp_path_factory.mktemp("bento")
    build_home = root / "build-home"
    model_tag = train_default_model(build_home)
    bento_tag = build(build_home)
    newer_tag = train_default_model(build_home)  # after the build: must not leak into the Bento
    archive = root / "recsys.bento"
    run([BENTOML_BIN, "export", bento_tag, str(archive)], build_home)
    yield {"root": root, "build_home": build_home, "model_tag": model_tag, "newer_tag": newer_tag,
           "bento_tag": bento_tag, "archive": archive}  # fmt: skip


def serve_and_recommend(bento_tag: str, home: Path, cwd: Path, extra_env: dict[str, str] | None = None
                        ) -> dict[str, Any]:  # fmt: skip
    proc: ServerProcess = start_server([bento_tag], cwd=cwd, env={"BENTOML_HOME": str(home), **(extra_env or {})})
    try:
        with bentoml.SyncHTTPClient(proc.url) as client:
            got = client.recommend(user_id="u1", k=5)
            info = client.model_info()
            assert info["tag"] == got["model_tag"] or info["challenger"]["tag"] == got["model_tag"]
            return {**got, "model_info": info}
    finally:
        assert proc.stop() in (0, -15)


def test_exported_bento_serves_from_an_isolated_store(built: dict[str, str | Path]) -> None:
    home = Path(built["root"]) / "isolated-home"
    run([BENTOML_BIN, "import", str(built["archive"])], home)
    models = run([BENTOML_BIN, "models", "list", "-o", "json"], home)
    assert str(built["model_tag"]).split(":")[1] in models
    assert str(built["newer_tag"]).split(":")[1] not in models
    got = serve_and_recommend(str(built["bento_tag"]), home, cwd=Path(built["root"]))
    assert got["model_tag"] == built["model_tag"]
    assert len(got["items"]) == 5 and got["fallback"] is False  # type: ignore[arg-type]


def test_bento_keeps_its_pinned_model_in_a_store_with_newer_versions(built: dict[str, str | Path]) -> None:
    got = serve_and_recommend(str(built["bento_tag"]), Path(built["build_home"]), cwd=Path(built["root"]))
    assert got["model_tag"] == built["model_tag"] != built["newer_tag"]


def test_a_bento_pins_champion_and_challenger(built: dict[str, str | Path]) -> None:
    """Built with a challenger in split mode, the Bento serves exactly the two versions it
    resolved at build time, after the registry has moved on."""
    home = Path(built["build_home"])
    champion, challenger = str(built["model_tag"]), str(built["newer_tag"])
    models_cli = [sys.executable, "-m", "training", "models"]
    run([*models_cli, "promote", champion], home)
    run([*models_cli, "promote", challenger, "--stage", "challenger"], home)
    split = {"RECSYS_CHALLENGER_MODE": "split", "RECSYS_CHALLENGER_SHARE": "0.5"}
    bento_tag = build(home, split)
    run([*models_cli, "promote", challenger], home)  # after the build: the champion changes
    bento_yaml = Path(run([BENTOML_BIN, "get", bento_tag, "-o", "path"], home).strip()) / "bento.yaml"
    assert champion in bento_yaml.read_text() and challenger in bento_yaml.read_text()
    info = serve_and_recommend(bento_tag, home, cwd=Path(built["root"]), extra_env=split)["model_info"]
    assert info["tag"] == champion and info["challenger"]["tag"] == challenger
    assert info["routing"] == {"mode": "split", "challenger_share": 0.5}


def test_the_kubernetes_commands_serve_the_bento_as_two_services(built: dict[str, str | Path]) -> None:
    """What deploy/k8s runs in each pod (the image's entrypoint turns the container args
    into `python -m bentoml_cli._internal.start ... $BENTO_PATH`), run here on the imported
    Bento: the ranking service alone, and the API service pointed at it by URL."""
    home = Path(built["root"]) / "k8s-home"
    run([BENTOML_BIN, "import", str(built["archive"])], home)
    bento_path = run([BENTOML_BIN, "get", str(built["bento_tag"]), "-o", "path"], home).strip()
    manifests = {d["metadata"]["name"]: d for d in render() if d["kind"] == "Deployment"}

    def start(name: str, env: dict[str, str]) -> ServerProcess:
        (container,) = manifests[name]["spec"]["template"]["spec"]["containers"]
        args = [a for a in container["args"]]
        port = free_port()
        args[args.index("--port") + 1], args[args.index("--host") + 1] = str(port), "127.0.0.1"
        command = [sys.executable, "-m", "bentoml_cli._internal.start", *args, bento_path]
        return start_process(command, Path(built["root"]), {"BENTOML_HOME": str(home), **env}, port,
                             home / f"{name}.log")  # fmt: skip

    ranker = start("recsys-ranker", {})
    try:
        api = start("recsys-api", {"RECSYS_RANKER_URLS": ranker.url})
        try:
            with bentoml.SyncHTTPClient(api.url) as client:
                got = client.recommend(user_id="u1", k=5)
            assert got["model_tag"] == built["model_tag"] and len(got["items"]) == 5
            assert {name for name, _ in api.workers()} == {"ApiService"}  # no ranking service of its own
        finally:
            api.stop()
    finally:
        ranker.stop()
