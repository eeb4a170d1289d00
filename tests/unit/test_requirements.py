"""The three dependency sets: serving (requirements.txt, all that the Bento and its image
carry), training on top of it, tests on top of that; training's own packages are the ones
models/ may never import (the import contract of pyproject.toml)."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = "models imports no training-only package"


def read_set(name: str) -> tuple[list[str], list[str]]:
    """(the files it includes with -r, the distributions it names, normalized)."""
    includes, dists = [], []
    for raw in (ROOT / name).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r "):
            includes.append(line[3:].strip())
        elif line:
            dists.append(re.split(r"[\[=<>!~ ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return includes, dists


def test_each_set_builds_on_the_one_before_and_names_a_package_once() -> None:
    sets = {name: read_set(name) for name in ("requirements.txt", "requirements-train.txt", "requirements-dev.txt")}
    assert [includes for includes, _ in sets.values()] == [[], ["requirements.txt"], ["requirements-train.txt"]]
    named = [dist for _, dists in sets.values() for dist in dists]
    assert len(named) == len(set(named)), f"named in two sets: {sorted({d for d in named if named.count(d) > 1})}"


def test_the_bento_carries_the_serving_set_only() -> None:
    python = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]
    assert python["requirements_txt"] == "./requirements.txt" and "packages" not in python


def test_models_may_import_no_package_of_the_training_set() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    forbidden = set(next(c for c in contracts if c["name"].startswith(CONTRACT))["forbidden_modules"])
    modules_of: dict[str, set[str]] = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    _, train_only = read_set("requirements-train.txt")
    missing = {dist for dist in train_only if not modules_of.get(dist, set()) & forbidden}
    assert not missing, f"training-only packages that the contract {CONTRACT!r} lets models import: {missing}"
    owned = set().union(*(modules_of.get(dist, set()) for dist in train_only))
    assert forbidden <= owned, f"forbidden modules of no training-only package: {forbidden - owned}"


def test_the_package_version_is_the_projects() -> None:
    """models.__version__ (what /docs.json reports) is pyproject.toml's version."""
    import models

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert models.__version__ == project["version"]
