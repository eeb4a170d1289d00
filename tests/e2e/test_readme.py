"""README.md, run: its curl lines, its Python example, its example scripts and the main
command (`make serve`) against real servers, and its CLI lines, settings and metric names
against the code, so that the README cannot drift from what the project does."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import bentoml
import httpx
import pytest

from models.serving.settings import RecsysSettings
from tests.helpers import PROJECT_ROOT, ServerProcess, free_port, wait_ready
from training import drift_report, loop, replay
from training.__main__ import build_parser, generate_parser
from training.lifecycle import models_parser

pytestmark = pytest.mark.e2e
README = (PROJECT_ROOT / "README.md").read_text()
DOC_URL = "http://127.0.0.1:3000"
VENV_PYTHON = ".venv/bin/python"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def bash_lines(prefix: str) -> list[tuple[str, str]]:
    """(line, the comment line just above it) for bash lines starting with prefix."""
    out = []
    for block in blocks("bash"):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.startswith(prefix):
                out.append((line, lines[i - 1] if i else ""))
    return out


def test_readme_gives_the_two_commands() -> None:
    lines = [line for line, _ in bash_lines("make ")]
    assert [line.split("#")[0].strip() for line in lines] == ["make serve", "make test"]
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (PROJECT_ROOT / ".ci" / "run").read_text()


CURL_LINES = bash_lines("curl ")


@pytest.mark.parametrize(("line", "comment"), CURL_LINES, ids=[c[0][40:90] for c in CURL_LINES])
def test_readme_curl_lines(server: ServerProcess, line: str, comment: str) -> None:
    out = subprocess.run(
        ["bash", "-c", line.replace(DOC_URL, server.url)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    if "400" in comment:
        assert payload["error"] and payload["detail"][0]["loc"]
    else:
        assert "error" not in payload


def test_readme_python_example(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    (code,) = blocks("python")
    exec(compile(code.replace(DOC_URL, server.url), "README.md", "exec"), {})  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("recsys-test:")
    assert sorted(ast.literal_eval(printed[1])) == ["i1", "i2", "i3"]
    assert len(ast.literal_eval(printed[2])) == 1


@pytest.mark.parametrize("line", [line for line, _ in bash_lines(f"{VENV_PYTHON} examples/")])
def test_readme_example_scripts(server: ServerProcess, line: str) -> None:
    args = shlex.split(line.replace(DOC_URL, server.url))
    out = subprocess.run([sys.executable, *args[1:]], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    script, users = Path(args[1]).name, args[3:]
    if script == "client_sync.py":
        assert "model recsys-test:" in out.stdout and "rank: [" in out.stdout
    else:
        assert [line.split(":")[0] for line in out.stdout.splitlines()] == users


@pytest.mark.parametrize("line", [line for line, _ in bash_lines(f"{VENV_PYTHON} -m training")])
def test_readme_training_lines_parse(line: str) -> None:
    """Every documented command line parses (the `models` lines also run, in
    tests/integration/test_lifecycle.py)."""
    words = shlex.split(line, comments=True)[3:]
    if words[0] == "drift-report":
        args = drift_report.build_parser(RecsysSettings()).parse_args(words[1:])
        assert args.out
    elif words[0] == "models":
        assert models_parser().parse_args(words[1:]).command
    elif words[0] == "generate":
        assert generate_parser().parse_args(words[1:]).out
    elif words[0] == "replay":
        assert replay.build_parser(RecsysSettings()).parse_args(words[1:]).challenger
    elif words[0] == "loop":
        args = loop.build_parser(RecsysSettings()).parse_args(words[1:])
        assert args.once or args.interval > 0
    else:
        retrain = words[0] == "retrain"
        args = build_parser(retrain).parse_args(words[1:] if retrain else words)
        # No --dataset: the synthetic default, or the event log alone with --events.
        assert args.dataset in (None, "synthetic", "movielens", "interactions")


def test_readme_settings_table_matches_the_settings_class() -> None:
    documented = set(re.findall(r"`RECSYS_([A-Z_]+)`", README))
    fields = RecsysSettings.model_fields
    assert documented == {name.upper() for name, f in fields.items() if f.validation_alias is None}
    others = [f.validation_alias for f in fields.values() if isinstance(f.validation_alias, str)]
    assert others and all(f"| `{env}` |" in README for env in others)  # another tool's own name, e.g. MLflow's


def test_readme_metric_names_exist(server: ServerProcess) -> None:
    with bentoml.SyncHTTPClient(server.url) as client:
        client.recommend(user_id="u1", k=3)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in set(re.findall(r"`(bentoml_service_[a-z_]+)`", README)):
        assert name in text, name


@pytest.mark.slow
def test_make_serve_trains_then_serves(tmp_path: Path) -> None:
    """The main job: `make serve` trains a version into the store and serves it."""
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("RECSYS_MODEL_TAG", None)
    log_path = tmp_path / "make-serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["make", "serve", f"PORT={port}", "TRAIN_ARGS=--n-users 300 --n-items 200 --n-interactions 12000"],
            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_ready(server, timeout=240)
        with bentoml.SyncHTTPClient(server.url) as client:
            rec = client.recommend(user_id="u1", k=5)
        assert rec["model_tag"].startswith("recsys-ranker:") and len(rec["items"]) == 5
        printed = server.log()
        assert "NDCG@10" in printed and f"http://127.0.0.1:{port}/recommend" in printed
    finally:
        server.stop()


def test_readme_kubernetes_lines_render_and_validate(tmp_path: Path) -> None:
    """The README's render + validate lines, run in order in a scratch folder."""
    lines = [line for line, _ in bash_lines(".venv/bin/python -m deploy.render")]
    lines += [line for line, _ in bash_lines(".venv/bin/kubernetes-validate")]
    assert len(lines) == 2
    for line in lines:
        command = line.replace(".venv/bin/", f"{PROJECT_ROOT}/.venv/bin/")
        out = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})  # fmt: skip
        assert out.returncode == 0, f"{line}\n{out.stdout}\n{out.stderr}"
    assert "registry.example.com/recsys:v1" in (tmp_path / "recsys.yaml").read_text()
