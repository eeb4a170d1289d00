"""Model stages over the MLflow Model Registry: which version is the `champion` (served by
default), which the `challenger`, the champions before them (for rollback), and the record of
promotions, rollbacks and retraining decisions. Many machines share it through one tracking
server; one machine alone gets an embedded SQLite registry under BENTOML_HOME.

Where: `MLFLOW_TRACKING_URI` when set (a tracking server with a real database, shared by the
machines that train and serve), else `sqlite:///$BENTOML_HOME/mlflow.db` with artifacts in
`$BENTOML_HOME/mlartifacts` (no server needed; `mlflow ui --backend-store-uri` opens it).

How the registry's state maps onto MLflow:
- the registered model is named after the BentoML model; each BentoML version is an MLflow
  model version whose tags carry its BentoML tag (`bentoml_tag`), dataset name and hash,
  schema hash, code version and metrics (JSON). Its source is the version's whole folder
  (booster, tables, manifest, report), logged as the `bentoml/` artifacts of its training
  run (or of a `register` run for a version saved outside training), so a machine that lacks
  it can fetch it (`ensure_local`);
- stages are the aliases `champion` and `challenger`;
- the rollback history is the registered-model tag `recsys.history` (JSON list of tags,
  newest last, the last _MAX_HISTORY kept);
- events are registered-model tags `recsys.event.<ns>.<hex>` (JSON each; the key sorts by
  time and never collides between writers), the last _MAX_EVENTS kept.

Compare-and-swap: MLflow has no transaction, so every read-modify-write of a name's state
holds a lock that is itself a registered model, `<name>.lock`: creating a registered model is
atomic in the tracking database (its name is unique), so exactly one writer, on any machine,
gets it; the others retry until LOCK_TIMEOUT_S. `promote(..., expected_champion=...)` reads
the champion under that lock. A lock older than LOCK_STALE_S (its holder died) is broken; the
windows left are a holder stalled for longer than that (no registry write takes that long:
uploads happen before the lock is taken) and two waiters breaking one stale lock at the same
instant (the second can delete the first's new lock). A
failure between the writes of one change (history, then aliases, then events, each atomic on
its own) is undone where it can be (a failed alias write puts the history back); a process
killed between them can leave part of it applied, never an event without its change.

Local mirror: the `stage` label in model.yaml of the versions in this machine's store, so
`bentoml models get` shows it; other machines' labels follow when they next write. MLflow is
the source of truth.

Migration: a JSON registry of before (`$BENTOML_HOME/registry/<name>.json`) is imported once,
on the first access of that name, under the lock: its stages, history and events move to
MLflow (its versions uploaded from the local store) and the file is renamed to
`<name>.json.imported`. A stage naming a version that is not in the store stops the import
with a RegistryError naming the file and the version.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import bentoml
import yaml
from bentoml.exceptions import NotFound

from models.lifecycle.store import ModelCheckError, check_version, import_folder, store_home, write_durably

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion
    from mlflow.tracking import MlflowClient

Stage = Literal["champion", "challenger"]
STAGES: tuple[Stage, ...] = ("champion", "challenger")
ALIASES = (*STAGES, "latest")
STAGE_LABEL = "stage"
TAG_KEY = "bentoml_tag"
HISTORY_KEY = "recsys.history"
EVENT_PREFIX = "recsys.event."
ARTIFACT_PATH = "bentoml"  # the version folder's place among its run's artifacts
LOCK_SUFFIX = ".lock"
LOCK_TIMEOUT_S = 30.0
LOCK_STALE_S = 60.0
_MAX_EVENTS = 1000
_MAX_HISTORY = 1000


class RegistryError(ValueError):
    """A registry operation that cannot be done; the message says why and what to do."""


class ChampionChanged(RegistryError):
    """A promotion refused because the champion is no longer the one it was judged against."""

    def __init__(self, tag: str, expected: str | None, actual: str | None) -> None:
        self.tag, self.expected, self.actual = tag, expected, actual
        super().__init__(
            f"{tag} not promoted: the champion changed from {expected} to {actual} since it was evaluated"
        )


class _AnyChampion(enum.Enum):
    ANY = "any"


ANY_CHAMPION = _AnyChampion.ANY  # `promote` without a compare-and-swap on the champion


@dataclass
class Registry:
    """The stages of one model name. `history` holds the previous champions, newest last."""

    name: str
    champion: str | None = None
    challenger: str | None = None
    history: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def stage_of(self, tag: str) -> str | None:
        if tag == self.champion:
            return "champion"
        if tag == self.challenger:
            return "challenger"
        return None


# ---- MLflow ----------------------------------------------------------------------------


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded SQLite registry of this BENTOML_HOME."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_home() / 'mlflow.db'}"


def embedded_artifact_root() -> Path:
    return store_home() / "mlartifacts"


def mlflow_client() -> MlflowClient:
    """A client of the registry in force (one per URI and process: it holds the DB engine)."""
    return _client_for(tracking_uri())


@functools.lru_cache(maxsize=8)
def _client_for(uri: str) -> MlflowClient:
    # Progress bars of artifact transfers would go to the service's and the CLI's stderr.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient  # here: ~2 s and ~45 MB, only where stages are read

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _mlflow_error(err: Exception, code: str) -> bool:
    return getattr(err, "error_code", None) == code


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment of a model name's training runs (made on first use)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    # Embedded: artifacts beside the store (MLflow's default is ./mlruns of the working
    # directory). A server: its own artifact root (`--artifacts-destination`).
    location = embedded_artifact_root().as_uri() if "MLFLOW_TRACKING_URI" not in os.environ else None
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException as err:
        if not _mlflow_error(err, "RESOURCE_ALREADY_EXISTS"):
            raise
        again = client.get_experiment_by_name(name)  # made by another writer meanwhile
        assert again is not None
        return str(again.experiment_id)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="BentoML model versions of recsys-bento")
    except MlflowException as err:
        if not _mlflow_error(err, "RESOURCE_ALREADY_EXISTS"):
            raise


def _quote(value: str) -> str:
    if "'" in value:
        raise RegistryError(f"model tag {value!r}: a tag may not contain a quote")
    return f"'{value}'"


def find_version(client: MlflowClient, tag: str) -> MlflowModelVersion | None:
    """The MLflow model version of a BentoML tag (the lowest if it was registered twice)."""
    name = tag.split(":")[0]
    found = client.search_model_versions(f"name={_quote(name)} and tag.{TAG_KEY}={_quote(tag)}")
    return min(found, key=lambda v: int(v.version)) if found else None


def _version_tags(model: bentoml.Model) -> dict[str, str]:
    meta = model.info.metadata
    data = meta.get("dataset", {})
    tags = {
        TAG_KEY: str(model.tag),
        "dataset_name": data.get("name"),
        "dataset_hash": data.get("content_hash"),
        "schema_hash": meta.get("schema_hash"),
        "code_version": meta.get("code_version"),
        "created_at": model.info.creation_time.isoformat(),
        "metrics": json.dumps(meta["metrics"], default=str) if "metrics" in meta else None,
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


def register_version(tag: str, run_id: str | None = None) -> str:
    """Make the stored version `tag` an MLflow model version (its folder uploaded as the
    artifacts of `run_id`, or of a run of its own) and return its MLflow version number.
    Checked first: a damaged version is never registered. Does nothing when it already is."""
    client = mlflow_client()
    existing = find_version(client, tag)
    if existing is not None:
        return str(existing.version)
    try:
        model = bentoml.models.get(tag)
    except NotFound as err:
        raise RegistryError(f"{tag}: no such model version in the store (see `python -m training models list`)") from err
    check_version(model)
    name = str(model.tag.name)
    own_run = run_id is None
    if run_id is None:
        run_id = client.create_run(experiment_id(client, name), run_name=f"register {tag}",
                                   tags={TAG_KEY: tag}).info.run_id  # fmt: skip
    client.log_artifacts(run_id, str(model.path), ARTIFACT_PATH)
    if own_run:
        client.set_terminated(run_id)
    _ensure_registered_model(client, name)
    run = client.get_run(run_id)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}", run_id=run_id,
                                          tags=_version_tags(model))  # fmt: skip
    return str(version.version)


def _tag_of_version(client: MlflowClient, name: str, version: str) -> str:
    mv = client.get_model_version(name, version)
    tag = mv.tags.get(TAG_KEY)
    if not tag:
        raise RegistryError(f"MLflow model {name} version {version} has no {TAG_KEY} tag: not a BentoML version")
    return str(tag)


# ---- reading and writing a name's state -------------------------------------------------


def registry_path(name: str) -> Path:
    """The JSON registry of before MLflow (imported once, see the module docstring)."""
    return store_home() / "registry" / f"{name}.json"


def _read(client: MlflowClient, name: str) -> Registry:
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
    except MlflowException as err:
        if _mlflow_error(err, "RESOURCE_DOES_NOT_EXIST"):
            return Registry(name)
        raise
    stages = {alias: _tag_of_version(client, name, str(v)) for alias, v in (rm.aliases or {}).items() if alias in STAGES}
    tags = dict(rm.tags or {})
    events = [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(EVENT_PREFIX))]
    return Registry(name, stages.get("champion"), stages.get("challenger"),
                    json.loads(tags.get(HISTORY_KEY, "[]")), events)  # fmt: skip


def _nothing_registered() -> bool:
    """The embedded registry was never written (reading it would create its database, ~8 s)."""
    return "MLFLOW_TRACKING_URI" not in os.environ and not (store_home() / "mlflow.db").is_file()


def load(name: str) -> Registry:
    """The stages of `name`. RegistryError when the registry cannot be read (a server that is
    down, after MLflow's retries; tags edited by hand), so that a caller that polls (live
    reload) keeps serving what it has."""
    from mlflow.exceptions import MlflowException

    _import_json_once(name)
    if _nothing_registered():
        return Registry(name)
    try:
        return _read(mlflow_client(), name)
    except ValueError as err:  # a tag that is not our JSON: someone edited it by hand
        raise RegistryError(f"MLflow registered model {name} at {tracking_uri()}: unreadable tags: {err}") from err
    except MlflowException as err:
        raise RegistryError(f"MLflow registry {tracking_uri()}: cannot read the stages of {name}: {err}") from err


@contextmanager
def _mlflow_lock(client: MlflowClient, name: str) -> Iterator[None]:
    """Hold `<name>.lock` (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            client.create_registered_model(lock, tags={"owner": owner, "at": str(time.time())},
                                           description="recsys-bento: held while the stages change")  # fmt: skip
            break
        except MlflowException as err:
            if not _mlflow_error(err, "RESOURCE_ALREADY_EXISTS"):
                raise
        _break_if_stale(client, lock)
        if time.monotonic() > deadline:
            raise RegistryError(
                f"model {name}: the registry lock {lock} was held by another writer for more than "
                f"{LOCK_TIMEOUT_S:.0f} s; retry (a lock older than {LOCK_STALE_S:.0f} s is broken)"
            )
        time.sleep(0.02 + 0.08 * secrets.randbelow(100) / 100)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _break_if_stale(client: MlflowClient, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        held = client.get_registered_model(lock)
        if time.time() - float(held.tags.get("at", "0")) > LOCK_STALE_S:
            client.delete_registered_model(lock)
    except MlflowException as err:
        if not _mlflow_error(err, "RESOURCE_DOES_NOT_EXIST"):  # released meanwhile
            raise


@contextmanager
def _locked(name: str) -> Iterator[Registry]:
    """Read-modify-write of one name's state under its lock; only what changed is written,
    and the stage labels of the local versions follow."""
    client = mlflow_client()
    _import_json_once(name)
    with _mlflow_lock(client, name):
        reg = _read(client, name)
        before = Registry(name, reg.champion, reg.challenger, list(reg.history), list(reg.events))
        yield reg
        _write(client, before, reg)
    for tag in sorted({t for t in (before.champion, before.challenger, reg.champion, reg.challenger) if t}):
        _mirror_label(tag, reg.stage_of(tag))


def _write(client: MlflowClient, before: Registry, after: Registry) -> None:
    name = after.name
    versions = {t: register_version(t) for t in {after.champion, after.challenger} if t}  # uploads first: the likely failure
    _ensure_registered_model(client, name)
    history_changed = after.history != before.history
    if history_changed:
        client.set_registered_model_tag(name, HISTORY_KEY, json.dumps(after.history[-_MAX_HISTORY:]))
    stages_written = False
    try:
        for stage in STAGES:
            tag = getattr(after, stage)
            if tag == getattr(before, stage):
                continue
            if tag is None:
                client.delete_registered_model_alias(name, stage)
            else:
                client.set_registered_model_alias(name, stage, versions[tag])
        stages_written = True
    finally:
        if history_changed and not stages_written:  # the change did not happen: nor did its history
            client.set_registered_model_tag(name, HISTORY_KEY, json.dumps(before.history[-_MAX_HISTORY:]))
    added = after.events[len(before.events):]
    for event in added:
        key = f"{EVENT_PREFIX}{time.time_ns():020d}.{secrets.token_hex(4)}"
        client.set_registered_model_tag(name, key, json.dumps(event, default=str))
    if added and len(after.events) > _MAX_EVENTS:
        tags = client.get_registered_model(name).tags
        for key in sorted(k for k in tags if k.startswith(EVENT_PREFIX))[:-_MAX_EVENTS]:
            client.delete_registered_model_tag(name, key)


def _mirror_label(tag: str, stage: str | None) -> None:
    """Write the `stage` label into the local version's model.yaml (atomically)."""
    try:
        model = bentoml.models.get(tag)
    except NotFound:
        return  # not on this machine, or deleted from the store since; the registry still names it
    path = Path(model.path) / "model.yaml"
    info = yaml.safe_load(path.read_text())
    labels = dict(info.get("labels") or {})
    if labels.get(STAGE_LABEL) == stage:
        return
    if stage is None:
        labels.pop(STAGE_LABEL, None)
    else:
        labels[STAGE_LABEL] = stage
    info["labels"] = labels
    write_durably(path, yaml.safe_dump(info, sort_keys=False))


def _import_json_once(name: str) -> None:
    """Move a JSON registry of before into MLflow, once (see the module docstring)."""
    path = registry_path(name)
    if not path.is_file():
        return
    try:
        old = Registry(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise RegistryError(f"{path}: unreadable registry file: {err}") from err
    client = mlflow_client()
    with _mlflow_lock(client, name):
        if not path.is_file():  # imported by another process meanwhile
            return
        for stage in STAGES:
            tag = getattr(old, stage)
            if tag is not None and not in_local_store(tag) and find_version(client, tag) is None:
                raise RegistryError(f"{path}: cannot import the {stage} {tag} into MLflow: it is not in the "
                                    "store; restore it, or remove that stage from the file")  # fmt: skip
        current = _read(client, name)
        history = [t for t in old.history if in_local_store(t) or find_version(client, t) is not None]
        events = [*old.events, {"at": _now(), "action": "import", "tag": None, "reason": f"imported from {path}"}]
        _write(client, current, Registry(name, old.champion, old.challenger, history, [*current.events, *events]))
        os.replace(path, path.with_name(f"{path.name}.imported"))
    for tag in (old.champion, old.challenger):
        if tag:
            _mirror_label(tag, old.stage_of(tag))


def in_local_store(tag: str) -> bool:
    """Whether the exact version `tag` is in this machine's BentoML store."""
    try:
        bentoml.models.get(tag)
    except NotFound:
        return False
    return True


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ---- the interface -----------------------------------------------------------------------


def exact_tag(tag: str) -> str:
    """`name:version` of a version in the store (resolves `name:latest`) or in the registry;
    RegistryError if in neither."""
    try:
        return str(bentoml.models.get(tag).tag)
    except NotFound as err:
        if (not tag.endswith(":latest") and ":" in tag and not _nothing_registered()
                and find_version(mlflow_client(), tag) is not None):  # fmt: skip
            return tag  # trained on another machine: promotable here, fetched where it is served
        raise RegistryError(f"{tag}: no such model version in the store (see `python -m training models list`)") from err


def promote(
    tag: str,
    stage: Stage = "champion",
    reason: str = "manual",
    record: dict[str, Any] | None = None,
    expected_champion: str | None | _AnyChampion = ANY_CHAMPION,
) -> Registry:
    """Make `tag` the champion (the previous one goes to the rollback history) or the
    challenger. Promoting the challenger to champion clears the challenger stage.

    With `expected_champion` (a tag, or None for "no champion yet") this is a
    compare-and-swap under the registry's lock: a promotion judged against that champion is
    refused when another one has taken its place meanwhile. The refusal is recorded as a
    `promote_refused` event, nothing else changes, and ChampionChanged is raised."""
    if stage not in STAGES:
        raise RegistryError(f"stage {stage!r}: valid stages are {', '.join(STAGES)}")
    tag = exact_tag(tag)
    name = tag.split(":")[0]
    register_version(tag)  # before the lock: the upload is the slow part
    refused: ChampionChanged | None = None
    with _locked(name) as reg:
        if expected_champion is not ANY_CHAMPION and reg.champion != expected_champion:
            refused = ChampionChanged(tag, expected_champion, reg.champion)
            reg.events.append({"at": _now(), "action": "promote_refused", "stage": stage, "tag": tag,
                               "reason": reason, **(record or {}), "expected_champion": expected_champion,
                               "current_champion": reg.champion, "refused": str(refused)})  # fmt: skip
        else:
            previous = getattr(reg, stage)
            if stage == "champion":
                if reg.champion and reg.champion != tag:
                    reg.history.append(reg.champion)
                reg.champion = tag
                if reg.challenger == tag:
                    reg.challenger = None
            else:
                if reg.champion == tag:
                    raise RegistryError(f"{tag} is the champion; it cannot also be the challenger")
                reg.challenger = tag
            reg.events.append({"at": _now(), "action": "promote", "stage": stage, "tag": tag,
                               "previous": previous, "reason": reason, **(record or {})})  # fmt: skip
    if refused is not None:
        raise refused
    return reg


def clear_challenger(name: str, reason: str = "manual") -> Registry:
    with _locked(name) as reg:
        reg.events.append({"at": _now(), "action": "clear_challenger", "tag": reg.challenger, "reason": reason})
        reg.challenger = None
    return reg


def rollback(name: str, reason: str = "manual") -> Registry:
    """Make the previous champion the champion again; the current one loses its stage."""
    with _locked(name) as reg:
        if not reg.history:
            raise RegistryError(f"{name}: no previous champion to roll back to (history is empty)")
        current, reg.champion = reg.champion, reg.history.pop()
        if reg.challenger == reg.champion:
            reg.challenger = None
        reg.events.append({"at": _now(), "action": "rollback", "stage": "champion", "tag": reg.champion,
                           "previous": current, "reason": reason})  # fmt: skip
    return reg


def record(name: str, event: dict[str, Any]) -> None:
    """Append an event (e.g. a retraining decision that promoted nothing)."""
    with _locked(name) as reg:
        reg.events.append({"at": _now(), **event})


def resolve_alias(name: str, alias: str) -> str:
    """The exact tag behind `champion`, `challenger` or `latest`; ModelCheckError if none."""
    if alias not in ALIASES:
        raise ModelCheckError(f"model alias {alias!r}: valid aliases are {', '.join(ALIASES)}")
    if alias == "latest":
        try:
            return exact_tag(f"{name}:latest")
        except RegistryError as err:
            raise ModelCheckError(str(err)) from err
    tag: str | None = getattr(load(name), alias)
    if tag is None:
        raise ModelCheckError(
            f"model {name}: no {alias} in the MLflow registry {tracking_uri()}; train one with "
            f"`python -m training` or promote a version with `python -m training models promote TAG"
            f"{'' if alias == 'champion' else ' --stage challenger'}`"
        )
    return tag


def ensure_local(tag: str) -> None:
    """Make sure the exact version `tag` is in the local store and passes its checks: a
    version trained elsewhere is downloaded from the registry's artifact store, checked
    (manifest digests, schema hash) and only then moved into the store. ModelCheckError
    naming the tag and the cause if it is not usable."""
    from mlflow.exceptions import MlflowException

    try:
        check_version(bentoml.models.get(tag))
        return
    except NotFound:
        pass
    client = mlflow_client()
    try:
        found = find_version(client, tag)
    except MlflowException as err:
        raise ModelCheckError(f"model {tag}: not in the local store, and the registry {tracking_uri()} "
                              f"cannot be read: {err}") from err  # fmt: skip
    if found is None:
        raise ModelCheckError(f"model {tag}: neither in the local store nor in the MLflow registry {tracking_uri()}")
    import_folder(tag, lambda dst: _download(found.source, dst))


def _download(source: str, dst: Path) -> Path:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                         tracking_uri=tracking_uri()))  # fmt: skip
    except (MlflowException, OSError) as err:
        raise ModelCheckError(f"download of {source} failed: {err}") from err


def bento_pinned_tags(service_file: Path, model_name: str) -> list[str] | None:
    """The exact versions of `model_name` a Bento was built with, in declaration order
    (champion, then challenger), when `service_file` runs from inside a Bento
    (<bento>/src/service.py next to <bento>/bento.yaml); None outside a Bento.

    BentoML 1.4 serves a Bento from the local store against the *global* model store, where
    aliases move on with every promotion; pinning keeps a Bento's models fixed."""
    bento_yaml = service_file.resolve().parent.parent / "bento.yaml"
    if not bento_yaml.is_file():
        return None
    info = yaml.safe_load(bento_yaml.read_text())
    for svc in info.get("services") or []:
        tags = [str(m["tag"]) for m in svc.get("models") or [] if str(m.get("tag", "")).split(":")[0] == model_name]
        if tags:
            return list(dict.fromkeys(tags))
    return None
