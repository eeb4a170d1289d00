"""The model lifecycle on a real BentoML store (the session's temporary BENTOML_HOME):
stages, promotion and rollback, the retraining gate, and which versions a service resolves.
Each test uses its own model name, so each has its own registry."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import bentoml
import pytest
import yaml

import training.__main__ as training_main
from models.lifecycle import registry, store
from models.lifecycle.registry import ChampionChanged, RegistryError, bento_pinned_tags
from models.serving.plan import serving_plan
from models.serving.settings import RecsysSettings
from tests.helpers import PROJECT_ROOT, dead_pid, small_synthetic
from training.__main__ import main
from training.pipeline import TrainConfig, TrainResult, train

# The tuning has tests of its own (tests/integration/test_tuning.py); these runs fit the base only.
SMALL = ["--n-users", "600", "--n-items", "400", "--n-interactions", "30000", "--tune-budget", "0"]


@pytest.fixture(scope="module")
def two_versions() -> tuple[str, str]:
    """Two versions of one name, trained on different data."""
    tags = [train(small_synthetic(seed), TrainConfig(tune_budget_s=0), model_name="lc-int").tag for seed in (3, 4)]
    assert all(tags)
    return str(tags[0]), str(tags[1])


def stage_label(tag: str) -> str | None:
    return bentoml.models.get(tag).info.labels.get("stage")


def test_promote_then_rollback_restores_the_previous_champion(two_versions: tuple[str, str]) -> None:
    a, b = two_versions
    registry.promote(a)
    reg = registry.promote(b)
    assert (reg.champion, reg.history) == (b, [a])
    assert (stage_label(a), stage_label(b)) == (None, "champion")
    reg = registry.rollback("lc-int")
    assert reg.champion == a and reg.history == []
    assert (stage_label(a), stage_label(b)) == ("champion", None)
    assert registry.load("lc-int").champion == a  # persisted, not only returned
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback("lc-int")
    actions = [e["action"] for e in registry.load("lc-int").events]
    assert actions[-3:] == ["promote", "promote", "rollback"]


def test_challenger_stage(two_versions: tuple[str, str]) -> None:
    a, b = two_versions
    registry.promote(a)
    reg = registry.promote(b, "challenger")
    assert (reg.champion, reg.challenger, stage_label(b)) == (a, b, "challenger")
    with pytest.raises(RegistryError, match="is the champion"):
        registry.promote(a, "challenger")
    reg = registry.promote(b)  # the challenger wins: it is champion now, not both
    assert (reg.champion, reg.challenger, stage_label(b)) == (b, None, "champion")
    with pytest.raises(RegistryError, match="valid stages are champion, challenger"):
        registry.promote(a, "canary")  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="no such model version"):
        registry.promote("lc-int:doesnotexist")


@pytest.mark.parametrize("failing", ["log_artifacts", "set_registered_model_alias"])
def test_a_failed_registry_write_leaves_the_stages_as_they_were(
    two_versions: tuple[str, str], monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """The upload of a version not yet registered, or the alias write itself, fails: the
    stages, the history and the labels are as they were, and the lock is released."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    x, y = resave(two_versions[0], "lc-fail"), resave(two_versions[1], "lc-fail")
    registry.promote(x)
    before = registry.load("lc-fail")

    def broken(*args: object, **kwargs: object) -> None:
        raise MlflowException("artifact store unreachable")

    monkeypatch.setattr(MlflowClient, failing, broken)
    with pytest.raises(MlflowException, match="unreachable"):
        registry.promote(y)
    monkeypatch.undo()
    assert registry.load("lc-fail") == before and stage_label(x) == "champion" and stage_label(y) is None
    assert registry.promote(y).champion == y  # the lock was released


def test_promote_with_a_stale_expected_champion_changes_nothing_but_the_log(
    two_versions: tuple[str, str],
) -> None:
    a, b = two_versions
    registry.clear_challenger("lc-int")
    registry.promote(a)
    registry.promote(b, expected_champion=a)  # still the expected champion: swapped
    for stale in (a, None):  # None: "no champion yet", as a first version expects
        with pytest.raises(ChampionChanged, match=f"champion changed from {stale} to {b}"):
            registry.promote(a, "challenger" if stale else "champion", expected_champion=stale)
    reg = registry.load("lc-int")
    assert (reg.champion, reg.challenger, reg.history[-1]) == (b, None, a)
    assert (stage_label(a), stage_label(b)) == (None, "champion")
    refused = [(e["action"], e["tag"], e.get("expected_champion"), e.get("current_champion")) for e in reg.events]
    assert refused[-2:] == [("promote_refused", a, a, b), ("promote_refused", a, None, b)]


def resave(tag: str, name: str) -> str:
    """A new version of `name` with the contents of `tag`: a save without training."""
    version = store.open_version(tag)
    return store.save_version(name, version.load_booster(1), version.load_tables(), version.metadata, {})


def record_renames_and_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """("fsync", path) and ("rename", src, dst), real paths, in the order they happen."""
    log: list[tuple[str, ...]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd: int) -> None:
        log.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def renaming(real: Callable[[str, str], None]) -> Callable[[str, str], None]:
        def rename(src: str, dst: str) -> None:
            real(src, dst)
            log.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", renaming(real_replace))
    monkeypatch.setattr(os, "rename", renaming(real_rename))
    return log


@pytest.mark.parametrize("operation", ["save", "promote"])
def test_published_files_are_fsynced_before_and_their_folder_after_the_rename(
    two_versions: tuple[str, str], bentoml_home: Path, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    """A power loss cannot be simulated; what makes a rename survive one can be checked: the
    new file (or folder) reaches the disk before the rename, the folder's entry after it."""
    a, b = two_versions
    registry.promote(a)  # b's label changes below
    log = record_renames_and_fsyncs(monkeypatch)
    if operation == "save":
        name, version = resave(a, "lc-durable").split(":")
        published = {bentoml_home / "models" / name / version, bentoml_home / "models" / name / "latest"}
    else:
        published = {Path(bentoml.models.get(b).path) / "model.yaml"}  # the stage label
        registry.promote(b)
    monkeypatch.undo()
    home = os.path.realpath(bentoml_home)
    renames = [
        (i, src, dst)
        for i, (kind, *paths) in enumerate(log)
        if kind == "rename"
        for src, dst in [paths]
        if dst.startswith(home) and not dst.startswith(f"{home}/tmp/")  # published, not staging
    ]
    assert {os.path.realpath(p) for p in published} <= {dst for _, _, dst in renames}
    for i, src, dst in renames:
        assert ("fsync", src) in log[:i], f"{src} renamed to {dst} before it was fsync'd"
        folder = os.path.dirname(dst)
        assert ("fsync", folder) in log[i + 1 :], f"{folder} not fsync'd after {src} was renamed into it"


def test_a_save_removes_the_staging_folders_of_killed_saves_only(
    two_versions: tuple[str, str], bentoml_home: Path
) -> None:
    """Staging folders carry their owner's pid: a save removes those whose owner is gone
    (and old nameless ones after a day), never one of a save still running."""
    gone = dead_pid()
    sleeper = subprocess.Popen(["sleep", "300"])
    tmp_root = bentoml_home / "tmp"
    folders = {
        "owner gone": tmp_root / f"{store.STAGING_PREFIX}{gone}-k1ll3d",
        "owner alive": tmp_root / f"{store.STAGING_PREFIX}{sleeper.pid}-saving",
        "no pid, old": tmp_root / f"{store.STAGING_PREFIX}0ldst7le",
        "no pid, recent": tmp_root / f"{store.STAGING_PREFIX}n3wst7le",
    }
    try:
        for folder in folders.values():
            (folder / "lc-staging").mkdir(parents=True)
        long_ago = time.time() - store.LEGACY_STAGING_MAX_AGE_S - 60
        os.utime(folders["no pid, old"], (long_ago, long_ago))
        resave(two_versions[0], "lc-staging")
        left = sorted(k for k, folder in folders.items() if folder.exists())
    finally:
        sleeper.kill()
        sleeper.wait()
    assert left == ["no pid, recent", "owner alive"]
    assert not list(tmp_root.glob(f"{store.STAGING_PREFIX}{os.getpid()}-*"))  # its own, removed as it ends


def test_serving_plan_resolves_aliases_and_explains_what_is_missing(two_versions: tuple[str, str]) -> None:
    a, b = two_versions
    registry.promote(a)
    registry.clear_challenger("lc-int")
    here = Path(__file__)
    plan = serving_plan(RecsysSettings(model_name="lc-int"), here)
    assert (plan.champion, plan.challenger, plan.problem) == (a, None, None)
    assert serving_plan(RecsysSettings(model_name="lc-int", model_alias="latest"), here).champion == b
    assert serving_plan(RecsysSettings(model_name="lc-int", model_tag=b), here).champion == b
    pinned = RecsysSettings(model_name="lc-int", challenger_mode="split", reload_interval_s=0)
    missing = serving_plan(pinned, here)
    assert missing.problem and "no challenger" in missing.problem and "promote" in missing.problem
    # Following the registry, the champion serves alone until a challenger is staged.
    following = serving_plan(RecsysSettings(model_name="lc-int", challenger_mode="split"), here)
    assert (following.champion, following.challenger, following.problem) == (a, None, None)
    registry.promote(b, "challenger")
    plan = serving_plan(RecsysSettings(model_name="lc-int", challenger_mode="shadow"), here)
    assert (plan.champion, plan.challenger, plan.problem) == (a, b, None)
    nothing = serving_plan(RecsysSettings(model_name="lc-never-trained"), here)
    assert nothing.problem and "no champion" in nothing.problem


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"name": "lc-damaged", "champion": 1, "owner": "x"}'],
    ids=["invalid JSON", "not an object", "unknown key"],
)
def test_a_damaged_registry_is_a_one_line_plan_problem_naming_the_file(content: str) -> None:
    """Not a RegistryError out of service.py's import: the plan's problem, which `serve`
    raises before any worker starts."""
    path = registry.registry_path("lc-damaged")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    try:
        plan = serving_plan(RecsysSettings(model_name="lc-damaged"), Path(__file__))
    finally:
        path.unlink()
    assert plan.problem is not None and str(path) in plan.problem and "RECSYS_MODEL_TAG" in plan.problem
    assert "\n" not in plan.problem


def test_a_bento_lists_champion_then_challenger(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    service_file = tmp_path / "src" / "service.py"
    service_file.write_text("")
    models = [{"tag": "m:champ"}, {"tag": "other:x"}, {"tag": "m:chall"}]
    (tmp_path / "bento.yaml").write_text(yaml.safe_dump({"services": [{"name": "A", "models": models}]}))
    assert bento_pinned_tags(service_file, "m") == ["m:champ", "m:chall"]
    assert bento_pinned_tags(Path(__file__), "m") is None  # not inside a Bento
    plan = serving_plan(RecsysSettings(model_name="m", challenger_mode="split"), service_file)
    assert (plan.champion, plan.challenger) == ("m:champ", "m:chall")


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_retraining_never_promotes_a_model_trained_on_shuffled_labels(capsys: pytest.CaptureFixture[str]) -> None:
    first = run([*SMALL, "--model-name", "lc-shuffle"], capsys)
    assert first["champion"] == first["tag"] and first["decision"]["promote"] is True
    bad = run(["retrain", *SMALL, "--model-name", "lc-shuffle", "--shuffle-labels", "--margin", "0.5"], capsys)
    assert bad["decision"]["promote"] is False
    assert bad["champion"] == first["tag"] != bad["tag"]
    assert bad["metrics"]["model"]["ndcg"] < bad["champion_metrics"]["model"]["ndcg"]
    rejected = registry.load("lc-shuffle").events[-1]
    assert rejected["action"] == "reject" and rejected["tag"] == bad["tag"]
    assert rejected["challenger_metrics"] == bad["metrics"] and rejected["champion_metrics"] == bad["champion_metrics"]
    assert bentoml.models.get(bad["tag"]).info.labels.get("stage") is None  # kept, never staged


def test_retraining_promotes_a_model_as_good_and_records_why(capsys: pytest.CaptureFixture[str]) -> None:
    first = run([*SMALL, "--model-name", "lc-retrain"], capsys)
    again = run(["retrain", *SMALL, "--model-name", "lc-retrain"], capsys)
    # Same data: the champion, evaluated on the same fresh hold-out, scores what it scored.
    assert again["champion_metrics"]["model"]["ndcg"] == pytest.approx(first["metrics"]["model"]["ndcg"])
    assert again["decision"]["promote"] is True and again["champion"] == again["tag"]
    event = registry.load("lc-retrain").events[-1]
    assert event["action"] == "promote" and event["previous"] == first["tag"] and event["reason"] == "retrain"
    assert bentoml.models.get(again["tag"]).info.metadata["compared_with"]["tag"] == first["tag"]
    challenger = run(["retrain", *SMALL, "--model-name", "lc-retrain", "--seed", "8", "--stage", "challenger",
                      "--margin", "1"], capsys)  # fmt: skip
    assert challenger["champion"] == again["tag"] and challenger["challenger"] == challenger["tag"]


def test_retraining_never_replaces_a_champion_promoted_during_the_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The champion the challenger was judged against is read before training; if another
    version is promoted while it trains, the challenger does not replace that one."""
    first = run([*SMALL, "--model-name", "lc-race"], capsys)
    other = run([*SMALL, "--model-name", "lc-race", "--seed", "8"], capsys)["tag"]  # stored, not staged
    real_train = training_main.train

    def train_then_someone_promotes(*args: object, **kwargs: object) -> TrainResult:
        result = real_train(*args, **kwargs)  # type: ignore[arg-type]
        registry.promote(other, reason="manual, meanwhile")
        return result

    monkeypatch.setattr(training_main, "train", train_then_someone_promotes)
    raced = run(["retrain", *SMALL, "--model-name", "lc-race", "--margin", "1"], capsys)
    why = f"the champion changed from {first['tag']} to {other} during the run"
    assert raced["decision"]["promote"] is False and raced["decision"]["reason"] == why
    assert raced["champion"] == other != raced["tag"]
    assert bentoml.models.get(raced["tag"]).info.labels.get("stage") is None
    reg = registry.load("lc-race")
    assert (reg.champion, reg.history) == (other, [first["tag"]])
    refused = reg.events[-1]
    expected = ("promote_refused", raced["tag"], first["tag"], other)
    assert (refused["action"], refused["tag"], refused["champion"], refused["current_champion"]) == expected


def test_plain_training_does_not_replace_the_champion(capsys: pytest.CaptureFixture[str]) -> None:
    first = run([*SMALL, "--model-name", "lc-plain"], capsys)
    second = run([*SMALL, "--model-name", "lc-plain", "--seed", "8"], capsys)
    assert second["champion"] == first["tag"] and second["decision"] is None
    third = run([*SMALL, "--model-name", "lc-plain", "--seed", "9", "--promote"], capsys)
    assert third["champion"] == third["tag"]


def test_models_cli_list_show_compare(two_versions: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two_versions
    registry.promote(a)
    listed = run(["models", "list", "--name", "lc-int"], capsys)
    assert [r["tag"] for r in listed] == [b, a]  # newest first
    assert {r["tag"]: r["stage"] for r in listed}[a] == "champion"
    assert run(["models", "show", "champion", "--name", "lc-int"], capsys)["tag"] == a
    diff = run(["models", "compare", "lc-int:champion", b], capsys)
    ndcg = diff["metrics"]["model.ndcg"]
    assert ndcg["delta"] == pytest.approx(ndcg["b"] - ndcg["a"])
    assert diff["schema"]["same"] is True and diff["schema"]["added"] == [] and diff["same_data"] is False
    assert main(["models", "show", "lc-int:nope"]) == 2
    assert "no such model version" in capsys.readouterr().err


# `models ab-report` reads an event log, which these stages have not: tests/integration/
# test_ab_report.py runs it on a real one.
README_MODELS_LINES = [
    line.strip() for line in (PROJECT_ROOT / "README.md").read_text().splitlines()
    if line.startswith(".venv/bin/python -m training models ")
    and not line.startswith(".venv/bin/python -m training models ab-report")
]  # fmt: skip


def test_readme_models_lines_run_in_order(two_versions: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """The README's `models` lines, run as written (for this test's model name), in order."""
    a, b = two_versions
    registry.promote(b)
    registry.promote(a)  # champion a, b before it: `promote latest --stage challenger` and `rollback` apply
    assert len(README_MODELS_LINES) >= 5
    for line in README_MODELS_LINES:
        words = shlex.split(line.replace("recsys-ranker:", "lc-int:"), comments=True)[3:]
        assert main([*words, "--name", "lc-int"]) == 0, line
    capsys.readouterr()
    reg = registry.load("lc-int")
    assert (reg.champion, reg.challenger) == (b, None)  # the rollback brought b back
