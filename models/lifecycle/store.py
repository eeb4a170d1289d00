"""Model-store helpers: save a trained version (booster, serving tables, report, manifest)
into the BentoML model store, and open one for serving with its checks.

A version holds no pickle: the booster is UBJ, the tables Parquet and NPZ, the manifest
JSON. The manifest records a SHA-256 digest of every file; opening a version verifies
them and the feature-schema hash, so a damaged or incompatible model is never served.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bentoml
from bentoml.exceptions import NotFound

from models.core.params import CandidateParams
from models.core.schema import SCHEMA_HASH
from models.core.tables import ServingTables

if TYPE_CHECKING:
    import xgboost as xgb

DEFAULT_MODEL_NAME = "recsys-ranker"
BOOSTER_FILE = "ranker.ubj"
MANIFEST_FILE = "manifest.json"
_BENTOML_OWN_FILES = {"model.yaml"}


class ModelCheckError(RuntimeError):
    """A model version that must not be served; the message names the tag and the check."""


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: file_digest(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in _BENTOML_OWN_FILES | {MANIFEST_FILE}
    }


def store_home() -> Path:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def save_version(
    name: str,
    booster: xgb.Booster,
    tables: ServingTables,
    metadata: dict[str, Any],
    labels: dict[str, str],
    write_extra: Callable[[Path], None] | None = None,
) -> str:
    """Write one new version and return its tag, atomically.

    BentoML's own save copies file by file into the store: a run killed mid-copy leaves a
    half-written version there (and breaks `bentoml models list`). So the version is built
    in a staging store under BENTOML_HOME/tmp, then moved into place with one rename, and
    only then does `latest` (replaced atomically) point at it. A failed or killed run
    leaves the store exactly as it was."""
    from bentoml._internal.models.model import ModelStore

    home = store_home()
    staging_root = Path(tempfile.mkdtemp(prefix="recsys-staging-", dir=_ensure_dir(home / "tmp")))
    try:
        staging = ModelStore(str(staging_root))
        with bentoml.models.create(name, labels=labels, metadata=metadata, _model_store=staging) as model:
            folder = Path(model.path)
            booster.save_model(str(folder / BOOSTER_FILE))
            tables.save(folder)
            if write_extra is not None:
                write_extra(folder)
            manifest = {"schema_hash": SCHEMA_HASH, "files": _digests(folder)}
            (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        tag = model.tag
        staged = staging_root / tag.name / str(tag.version)
        final_parent = _ensure_dir(home / "models" / tag.name)
        os.rename(staged, final_parent / str(tag.version))
        latest_tmp = final_parent / f".latest-{tag.version}"
        latest_tmp.write_text(str(tag.version))
        os.replace(latest_tmp, final_parent / "latest")
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return str(tag)


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class ModelVersion:
    """A checked model version: where it is and what it says about itself."""

    tag: str
    path: Path
    metadata: dict[str, Any]
    creation_time: str

    @property
    def params(self) -> CandidateParams:
        return CandidateParams.from_dict(self.metadata["params"]["candidates"])

    def load_tables(self) -> ServingTables:
        return ServingTables.load(self.path)

    def load_booster(self, nthread: int) -> xgb.Booster:
        import xgboost as xgb  # here, not at import: the API workers never load XGBoost (~150 MB)

        booster = xgb.Booster(model_file=str(self.path / BOOSTER_FILE))
        booster.set_param({"nthread": nthread})
        return booster


def check_version(model: bentoml.Model) -> ModelVersion:
    """Verify a stored model's schema hash and file digests; raise ModelCheckError if not."""
    tag = str(model.tag)
    folder = Path(model.path)
    metadata = dict(model.info.metadata)
    model_hash = metadata.get("schema_hash")
    if model_hash != SCHEMA_HASH:
        raise ModelCheckError(
            f"model {tag}: schema hash check failed: the model was trained with {model_hash!r}, "
            f"this code builds {SCHEMA_HASH!r}; retrain, or serve with the code of that model"
        )
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ModelCheckError(f"model {tag}: manifest check failed: {MANIFEST_FILE}: {err}") from err
    expected: dict[str, str] = manifest.get("files", {})
    for fname, digest in sorted(expected.items()):
        path = folder / fname
        if not path.is_file():
            raise ModelCheckError(f"model {tag}: file check failed: {fname} is missing")
        if file_digest(path) != digest:
            raise ModelCheckError(f"model {tag}: digest check failed: {fname} is corrupted or truncated")
    return ModelVersion(tag, folder, metadata, model.info.creation_time.isoformat())


def open_version(tag: str) -> ModelVersion:
    """Find `tag` (name:version or name:latest) in the local store and check it."""
    try:
        model = bentoml.models.get(tag)
    except NotFound as err:
        raise ModelCheckError(
            f"model {tag}: not found in the BentoML store; train one with `python -m training`"
        ) from err
    return check_version(model)
