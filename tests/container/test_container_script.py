"""deploy/container.sh without building: the base image's key follows its inputs, and the
tools come from the settings, PATH or the project's .venv, in that order. Each run is a copy
of the script in a fake working copy with a PATH of its own (no buildah, no real bentoml), so
these are fast and need neither root nor a container runtime."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "deploy" / "container.sh"
# What the script runs before it builds; nothing else is on its PATH.
HOST_TOOLS = ("bash", "dirname", "sha256sum", "cut")
Change = Callable[["WorkingCopy"], dict[str, str]]  # edits the inputs, returns extra env


@dataclass(frozen=True)
class WorkingCopy:
    root: Path
    bin: Path  # the only directory on PATH
    ca: Path
    uv: Path  # a fake uv binary, on PATH

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        environ = {"PATH": str(self.bin), "HOST_CA_BUNDLE": str(self.ca), **env}
        return subprocess.run(
            [str(self.root / "deploy" / "container.sh"), *args],
            env=environ, capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    def key(self, **env: str) -> str:
        out = self.run("--base-key", **env)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def wc(tmp_path: Path) -> WorkingCopy:
    root = tmp_path / "wc"
    (root / "deploy").mkdir(parents=True)
    shutil.copy2(SCRIPT, root / "deploy" / "container.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in HOST_TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is needed to run the script"
        (bin_dir / tool).symlink_to(found)
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nfirst\n-----END CERTIFICATE-----\n")
    uv = executable(bin_dir / "uv", "#!/bin/sh\n# uv 1\n")
    return WorkingCopy(root, bin_dir, ca, uv)


def test_the_base_key_is_the_same_for_the_same_inputs(wc: WorkingCopy, tmp_path: Path) -> None:
    key = wc.key()
    assert len(key) == 16 and key == wc.key()
    # The same uv bytes elsewhere, a comment edited in the script: the same base.
    elsewhere = executable(tmp_path / "other" / "uv", wc.uv.read_text())
    assert wc.key(UV=str(elsewhere)) == key
    script = wc.root / "deploy" / "container.sh"
    script.write_text(script.read_text().replace("# The host's bundle, twice", "# The bundle of the host, twice"))
    assert wc.key() == key


def change_uv(wc: WorkingCopy) -> dict[str, str]:
    wc.uv.write_text("#!/bin/sh\n# uv 2\n")
    return {}


def remove_uv(wc: WorkingCopy) -> dict[str, str]:
    wc.uv.unlink()
    return {}


def change_ca(wc: WorkingCopy) -> dict[str, str]:
    wc.ca.write_text(wc.ca.read_text() + "-----BEGIN CERTIFICATE-----\nsecond\n-----END CERTIFICATE-----\n")
    return {}


def change_mirror(wc: WorkingCopy) -> dict[str, str]:
    return {"DEBIAN_MIRROR": "http://mirror.example/debian"}


def edit_script(old: str, new: str) -> Change:
    def change(wc: WorkingCopy) -> dict[str, str]:
        script = wc.root / "deploy" / "container.sh"
        text = script.read_text()
        assert old in text, f"{old!r} is no longer in container.sh"
        script.write_text(text.replace(old, new, 1))
        return {}

    return change


@pytest.mark.parametrize(
    "change",
    [
        change_uv, remove_uv, change_ca, change_mirror,
        edit_script("PACKAGES=python3,", "PACKAGES=curl,python3,"),
        edit_script("VARIANT=minbase", "VARIANT=buildd"),
        edit_script('ln -sf python3 "$rootfs/usr/bin/python"', 'ln -sf python3.11 "$rootfs/usr/bin/python"'),
    ],
    ids=["uv-binary", "uv-absent", "ca-bundle", "mirror", "packages", "variant", "build-code"],
)  # fmt: skip
def test_the_base_key_changes_with_each_input(wc: WorkingCopy, change: Change) -> None:
    before = wc.key()
    env = change(wc)
    assert wc.key(**env) != before


@pytest.mark.parametrize("where", ["setting", "path", "venv"])
def test_bentoml_comes_from_the_setting_then_path_then_the_venv(wc: WorkingCopy, tmp_path: Path, where: str) -> None:
    fake = "#!/bin/sh\necho fake bentoml\n"
    candidates = {
        "setting": executable(tmp_path / "chosen" / "bentoml", fake),
        "path": executable(wc.bin / "bentoml", fake),
        "venv": executable(wc.root / ".venv" / "bin" / "bentoml", fake),
    }
    order = list(candidates)
    for later in order[: order.index(where)]:  # remove the ones that take precedence
        candidates[later].unlink()
    env = {"BENTOML": str(candidates["setting"])} if where == "setting" else {}
    out = wc.run("--dry-run", "recsys:v1", "localhost/recsys:v1", **env)
    assert out.returncode == 0, out.stderr
    assert f"bentoml: {candidates[where]}\n" in out.stdout
    assert f"run: {candidates[where]} containerize --backend buildah recsys:v1 -t localhost/recsys:v1" in out.stdout
    assert f"base: localhost/recsys-base:{wc.key()}, tagged python:3.11-slim" in out.stdout


@pytest.mark.parametrize("setting", [None, "BENTOML", "UV"])
def test_a_missing_tool_fails_naming_it(wc: WorkingCopy, tmp_path: Path, setting: str | None) -> None:
    env = {setting: str(tmp_path / "nowhere")} if setting else {}
    out = wc.run("--dry-run", **env)
    assert out.returncode == 2
    if setting:
        assert f"error: {setting}={tmp_path / 'nowhere'} is not an executable {setting.lower()}" in out.stderr
    else:  # neither PATH nor a .venv has bentoml
        assert "error: bentoml not found: set BENTOML=" in out.stderr and "PATH" in out.stderr


def test_without_uv_the_base_has_none_and_says_so(wc: WorkingCopy) -> None:
    wc.uv.unlink()
    executable(wc.bin / "bentoml", "#!/bin/sh\n")
    out = wc.run("--dry-run")
    assert out.returncode == 0, out.stderr
    assert "uv: absent" in out.stdout and "note: uv not found" in out.stderr
