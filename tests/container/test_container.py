"""The production image: `bentoml build`, then deploy/container.sh (buildah, no Docker
engine), then the image run with `buildah run --network host` as its non-root user: it
serves recommendations. Reports the image size and the time from start to /readyz. Needs
buildah, runc and debootstrap, as root (CI installs them); skipped elsewhere, saying why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bentoml
import pytest

from bench.servers import ServerProcess, start_process
from tests.helpers import BENTOML_BIN, PROJECT_ROOT, free_port

pytestmark = [pytest.mark.container, pytest.mark.slow]
MISSING = [t for t in ("buildah", "runc", "debootstrap") if shutil.which(t) is None]
if MISSING or os.geteuid() != 0:
    pytestmark.append(pytest.mark.skip(
        reason=f"container build needs root and buildah, runc, debootstrap (missing: {MISSING or 'root'}); "
        "apt-get install buildah runc debootstrap"))  # fmt: skip
ENV = {"STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}
# The tools beside the interpreter that runs the tests, named rather than left to PATH; uv
# only if that venv has it (the script does without).
UV_BIN = Path(sys.executable).parent / "uv"
TOOLS = {"BENTOML": BENTOML_BIN, **({"UV": str(UV_BIN)} if UV_BIN.exists() else {})}
SMALL = ["--n-users", "400", "--n-items", "300", "--n-interactions", "20000", "--json"]


def run(args: list[str], home: Path, timeout: float = 1800) -> str:
    env = {**os.environ, **ENV, **TOOLS, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("RECSYS_MODEL_TAG", None)
    out = subprocess.run(args, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("container-home")
    model_tag = json.loads(run([sys.executable, "-m", "training", *SMALL], home))["tag"]
    out = run([BENTOML_BIN, "build", ".", "--output", "tag"], home)
    bento_tag = next(line.split("__tag__:")[1] for line in out.splitlines() if "__tag__:" in line).strip()
    image_tag = f"localhost/{bento_tag.replace(':', ':t')}"
    run([str(PROJECT_ROOT / "deploy" / "container.sh"), bento_tag, image_tag], home)
    yield {"image": image_tag, "model_tag": model_tag, "home": str(home)}
    subprocess.run(["buildah", "rmi", "-f", image_tag], env={**os.environ, **ENV}, capture_output=True)


def buildah(*args: str) -> str:
    out = subprocess.run(["buildah", *args], env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_image_serves_recommendations_as_a_non_root_user(image: dict[str, str]) -> None:
    ctr = buildah("from", "--quiet", image["image"])
    try:
        assert buildah("run", ctr, "--", "id", "-u") != "0"
        port = free_port()
        log = Path(image["home"]) / "container.log"
        command = ["buildah", "run", "--network", "host", ctr, "--",
                   "/home/bentoml/bento/env/docker/entrypoint.sh", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        started = time.monotonic()
        server: ServerProcess = start_process(command, PROJECT_ROOT, ENV, port, log, timeout=180)
        ready_s = time.monotonic() - started
        try:
            with bentoml.SyncHTTPClient(server.url) as client:
                got = client.recommend(user_id="u1", k=5)
            assert got["model_tag"] == image["model_tag"] and len(got["items"]) == 5
        finally:
            server.stop()
    finally:
        subprocess.run(["buildah", "rm", ctr], env={**os.environ, **ENV}, capture_output=True)
    size = buildah("images", "--format", "{{.Size}}", image["image"])
    print(f"\nimage {image['image']}: {size}, start to /readyz {ready_s:.1f} s")  # in the log (-rA / -s)
    assert size
