"""Which exact versions a service serves: from the settings, a Bento's pins, or the registry."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from models.lifecycle import registry
from models.lifecycle.registry import RegistryError, bento_pinned_tags, resolve_alias
from models.lifecycle.store import ModelCheckError
from models.serving.settings import RecsysSettings


@dataclass(frozen=True)
class ServingPlan:
    """The exact versions a service serves. `problem` says why there is none; the service
    raises it before any worker starts, so that importing service.py never fails."""

    champion: str
    challenger: str | None = None
    problem: str | None = None


# MLflow's HTTP client retries a failed call 7 times with a doubling back-off (minutes in
# all): a serving worker that polls the stages would hang that long on a server that is
# down. Serving keeps the old version and polls again instead, so it asks for little.
SERVING_MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}  # fmt: skip


def bound_registry_calls() -> None:
    """Short MLflow retries in the serving processes (values set by the user win)."""
    for key, value in SERVING_MLFLOW_HTTP.items():
        os.environ.setdefault(key, value)


def serving_plan(settings: RecsysSettings, service_file: Path) -> ServingPlan:
    """Champion: RECSYS_MODEL_TAG, else the version a Bento pinned, else the version behind
    RECSYS_MODEL_ALIAS in the registry. Challenger (when RECSYS_CHALLENGER_MODE is not off):
    RECSYS_CHALLENGER_TAG, else the Bento's second pinned version, else the registry's."""
    name = settings.model_name
    pinned = bento_pinned_tags(service_file, name)
    try:
        champion = settings.model_tag or (pinned[0] if pinned else resolve_alias(name, settings.model_alias))
        challenger = None
        if settings.challenger_mode != "off":
            if settings.challenger_tag:
                challenger = settings.challenger_tag
            elif pinned is not None:
                if len(pinned) < 2:
                    raise ModelCheckError(
                        f"RECSYS_CHALLENGER_MODE={settings.challenger_mode}: this Bento was built "
                        "without a challenger; build it with RECSYS_CHALLENGER_MODE set, or set "
                        "RECSYS_CHALLENGER_MODE=off"
                    )
                challenger = pinned[1]
            elif follows_registry(settings, service_file):
                # A service that follows the registry serves its champion alone until a
                # challenger is staged (e.g. by `python -m training loop`), as on a reload.
                challenger = registry.load(name).challenger
            else:
                challenger = resolve_alias(name, "challenger")
            if challenger == champion:
                raise ModelCheckError(f"champion and challenger are the same version {champion}")
    except ModelCheckError as err:
        return ServingPlan(f"{name}:unresolved", None, str(err))
    except RegistryError as err:  # a damaged registry file: one line naming it, not a traceback at import
        fix = "repair or restore that file, or serve an exact version with RECSYS_MODEL_TAG"
        return ServingPlan(f"{name}:unresolved", None, f"{err}; {fix}")
    return ServingPlan(champion, challenger)


Stages = tuple[str, str | None]  # (champion, challenger)


def follows_registry(settings: RecsysSettings, service_file: Path) -> bool:
    """Whether a running service follows the registry's stages (models/serving/reload.py):
    reload on (RECSYS_RELOAD_INTERVAL_S > 0), no exact RECSYS_MODEL_TAG, and outside a
    Bento unless RECSYS_FOLLOW_REGISTRY: a built Bento serves what it pinned."""
    if settings.reload_interval_s <= 0 or settings.model_tag:
        return False
    return settings.follow_registry or bento_pinned_tags(service_file, settings.model_name) is None


def wanted_stages(settings: RecsysSettings) -> Stages:
    """The versions the registry names now, for a service that follows it: the champion
    (RECSYS_MODEL_ALIAS), and unless RECSYS_CHALLENGER_MODE is off the challenger
    (RECSYS_CHALLENGER_TAG, else the registry's; None when it has none: a promoted or
    cleared challenger leaves the champion serving alone). ModelCheckError when there is no
    champion, RegistryError when the registry cannot be read."""
    name = settings.model_name
    champion = resolve_alias(name, settings.model_alias)
    challenger = None
    if settings.challenger_mode != "off":
        challenger = settings.challenger_tag or registry.load(name).challenger
        if challenger == champion:
            challenger = None
    return champion, challenger


def known_tags(name: str) -> Iterator[str]:
    """Every version of `name` a caller may name, for a ranking service asked to score a
    version it does not hold yet, lazily: the local store's versions first (newest first;
    no network), then the registry's stages and history (from a shared registry, which
    ensure_local fetches)."""
    try:
        stored = sorted(bentoml.models.list(name), key=lambda m: m.info.creation_time, reverse=True)
    except NotFound:  # no version of this name here (a shared registry may have some)
        stored = []
    yield from (str(m.tag) for m in stored)
    try:
        reg = registry.load(name)
    except RegistryError:
        return
    yield from (t for t in (reg.champion, reg.challenger, *reversed(reg.history)) if t)
