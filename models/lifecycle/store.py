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
import time
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
STAGING_PREFIX = "recsys-staging-"
# A staging folder without its owner's pid (made before the name carried it) is left to
# its save for this long; no save takes that long.
LEGACY_STAGING_MAX_AGE_S = 24 * 3600


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
    leaves the store exactly as it was, but for its staging folder, which the next save
    removes (`remove_orphan_staging`)."""
    from bentoml._internal.models.model import ModelStore

    home = store_home()
    tmp_root = _ensure_dir(home / "tmp")
    remove_orphan_staging(tmp_root)
    staging_root = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=tmp_root))
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
        # The files reach the disk before the rename that publishes them, and the rename
        # before `latest` names it: after a power loss `latest` never points at a torn version.
        for path in staged.rglob("*"):
            if path.is_file():
                fsync_path(path)
        fsync_path(staged)
        final_parent = _ensure_dir(home / "models" / tag.name)
        os.rename(staged, final_parent / str(tag.version))
        fsync_path(final_parent)
        write_durably(final_parent / "latest", str(tag.version))
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return str(tag)


def import_folder(tag: str, fetch: Callable[[Path], Path]) -> None:
    """Bring the version `tag`, made on another machine, into this store, checked.

    `fetch(dst)` writes the version's folder (its model.yaml and files) somewhere under `dst`
    and returns that folder. The copy is opened as a model of a staging store under
    BENTOML_HOME/tmp and checked (`check_version`: schema hash, every file's digest) before
    one rename publishes it, as `save_version` does; `latest` is set only if the name had
    none. ModelCheckError naming the tag and the cause if it is not usable; the store is
    then as it was. Another process importing the same version meanwhile is fine."""
    from bentoml._internal.models.model import ModelStore
    from bentoml.exceptions import BentoMLException

    name, _, version = tag.partition(":")
    home = store_home()
    tmp_root = _ensure_dir(home / "tmp")
    remove_orphan_staging(tmp_root)
    staging_root = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=tmp_root))
    try:
        try:
            fetched = fetch(staging_root / "download")
        except ModelCheckError as err:
            raise ModelCheckError(f"model {tag}: fetch failed: {err}") from err
        staged = _ensure_dir(staging_root / "store" / name) / version
        os.rename(fetched, staged)
        try:
            model = ModelStore(str(staging_root / "store")).get(tag)
        except (BentoMLException, OSError, ValueError) as err:  # NotFound is a BentoMLException
            raise ModelCheckError(f"model {tag}: the fetched copy is not a BentoML model: {err}") from err
        if str(model.tag) != tag:
            raise ModelCheckError(f"model {tag}: the fetched copy is {model.tag}")
        check_version(model)
        for path in staged.rglob("*"):
            if path.is_file():
                fsync_path(path)
        fsync_path(staged)
        final_parent = _ensure_dir(home / "models" / name)
        try:
            os.rename(staged, final_parent / version)
        except OSError:
            if not (final_parent / version).is_dir():
                raise
            return  # imported by another process meanwhile
        fsync_path(final_parent)
        if not (final_parent / "latest").is_file():
            write_durably(final_parent / "latest", version)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)


def write_durably(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename that survives a power loss: the temporary
    file is fsync'd before the rename (else the new name can point at empty data) and the
    folder after it (else the rename itself can be lost)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def fsync_path(path: str | Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine has this pid (a folder named after its owner's pid
    can go once the owner is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_orphan_staging(tmp_root: Path) -> list[Path]:
    """Remove the staging folders of saves that were killed: those whose owner's pid (in the
    name, `recsys-staging-<pid>-XXXX`) is no longer alive, and nameless old-style ones older
    than LEGACY_STAGING_MAX_AGE_S. Returns what was removed."""
    removed = []
    for folder in tmp_root.glob(f"{STAGING_PREFIX}*"):
        pid, sep, _ = folder.name.removeprefix(STAGING_PREFIX).partition("-")
        if sep and pid.isdigit():
            orphan = not pid_alive(int(pid))
        else:  # tempfile's random part has no "-": a folder from before the pid was in the name
            try:
                orphan = time.time() - folder.stat().st_mtime > LEGACY_STAGING_MAX_AGE_S
            except FileNotFoundError:
                continue  # its own save removed it meanwhile
        if orphan:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


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
