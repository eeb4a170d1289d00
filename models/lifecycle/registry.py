"""Model stages over the BentoML model store: which version is the `champion` (served by
default), which the `challenger`, and the champions before them (for rollback).

Self-hosted BentoML has no stages, so they live in one small JSON file per model name,
`BENTOML_HOME/registry/<name>.json`, replaced atomically and durably (fsync'd) under a file
lock. Every change is also mirrored into the versions' `stage` label (model.yaml, which the
integrity manifest leaves out), so `bentoml models get NAME:VERSION` shows it. The file is
the source of truth. A promotion decided against a champion can require that champion still
to be in place (`expected_champion`), so a slow retraining never replaces a newer one.
"""

from __future__ import annotations

import datetime as dt
import enum
import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import bentoml
import yaml
from bentoml.exceptions import NotFound

from models.lifecycle.store import ModelCheckError, store_home, write_durably

Stage = Literal["champion", "challenger"]
STAGES: tuple[Stage, ...] = ("champion", "challenger")
ALIASES = (*STAGES, "latest")
STAGE_LABEL = "stage"
_MAX_EVENTS = 1000


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


def registry_path(name: str) -> Path:
    return store_home() / "registry" / f"{name}.json"


def load(name: str) -> Registry:
    path = registry_path(name)
    if not path.is_file():
        return Registry(name)
    try:
        data = json.loads(path.read_text())
        return Registry(**data)
    except (ValueError, TypeError) as err:
        raise RegistryError(f"{path}: unreadable registry file: {err}") from err


@contextmanager
def _locked(name: str) -> Iterator[Registry]:
    """Read-modify-write of one name's registry, serialised across processes; the new state
    replaces the file in one rename and is mirrored into the stage labels."""
    path = registry_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        reg = load(name)
        before = {t: reg.stage_of(t) for t in (reg.champion, reg.challenger) if t}
        yield reg
        reg.events = reg.events[-_MAX_EVENTS:]
        write_durably(path, json.dumps(asdict(reg), indent=2))
        after = {t: reg.stage_of(t) for t in (reg.champion, reg.challenger) if t}
        for tag in sorted(set(before) | set(after)):
            _mirror_label(tag, after.get(tag))


def _mirror_label(tag: str, stage: str | None) -> None:
    """Write the `stage` label into the version's model.yaml (atomically)."""
    try:
        model = bentoml.models.get(tag)
    except NotFound:
        return  # deleted from the store since; the registry still names it
    path = Path(model.path) / "model.yaml"
    info = yaml.safe_load(path.read_text())
    labels = dict(info.get("labels") or {})
    if stage is None:
        labels.pop(STAGE_LABEL, None)
    else:
        labels[STAGE_LABEL] = stage
    info["labels"] = labels
    write_durably(path, yaml.safe_dump(info, sort_keys=False))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def exact_tag(tag: str) -> str:
    """`name:version` of a stored version (resolves `name:latest`); RegistryError if absent."""
    try:
        return str(bentoml.models.get(tag).tag)
    except NotFound as err:
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
            f"model {name}: no {alias} in the registry {registry_path(name)}; train one with "
            f"`python -m training` or promote a version with `python -m training models promote TAG"
            f"{'' if alias == 'champion' else ' --stage challenger'}`"
        )
    return tag


def ensure_local(tag: str) -> None:
    """Make sure the exact version `tag` is in the local store before it is opened. Local
    only: a version missing here is a ModelCheckError (a shared registry fetches it instead)."""
    try:
        bentoml.models.get(tag)
    except NotFound as err:
        raise ModelCheckError(
            f"model {tag}: not in the local store {store_home() / 'models'}; copy it here "
            "(`bentoml models export`/`import`) or serve from a machine that has it"
        ) from err


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
