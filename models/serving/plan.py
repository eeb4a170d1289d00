"""Which exact versions a service serves: from the settings, a Bento's pins, or the registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
