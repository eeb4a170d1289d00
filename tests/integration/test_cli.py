"""`python -m training` as a user runs it: a real subprocess, its output and exit status."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import bentoml
import pandas as pd
import pytest

from models.core.recommender import LocalRanker, Recommender
from models.lifecycle.store import open_version
from models.serving.settings import RecsysSettings
from models.serving.variants import REQUEST_LOG
from tests.helpers import PROJECT_ROOT
from training import drift_report, replay
from training.__main__ import COMMANDS, build_parser, generate_parser, main, train_config
from training.datasets import synthetic
from training.lifecycle import cmd_compare, cmd_show, models_parser
from training.pipeline import TrainConfig, TrainResult, train
from training.ranker import RankerParams
from training.replay import NOT_COMPARABLE, LoggedRequest, not_comparable_line
from training.replay import replay as replay_requests

# The tuning has tests of its own (tests/integration/test_tuning.py); these runs fit the base only.
SMALL = ["--n-users", "600", "--n-items", "400", "--n-interactions", "30000", "--tune-budget", "0"]


def run_cli(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENTOML_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "training", *args], cwd=PROJECT_ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_cli_trains_and_saves_a_version(bentoml_home: Path) -> None:
    out = run_cli([*SMALL, "--model-name", "recsys-cli", "--json"], bentoml_home)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["tag"].startswith("recsys-cli:")
    assert str(bentoml.models.get(result["tag"]).tag) == result["tag"]
    assert "fit ranker" in out.stderr  # staged progress with timings


def test_cli_dry_run_saves_nothing(bentoml_home: Path) -> None:
    out = run_cli([*SMALL, "--model-name", "recsys-cli-dry", "--dry-run"], bentoml_home)
    assert out.returncode == 0, out.stderr
    assert "NDCG@10" in out.stdout and "(dry run: not saved)" in out.stdout
    assert not [m for m in bentoml.models.list() if m.tag.name == "recsys-cli-dry"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "movielens"], "--dataset movielens needs --data PATH"),
        (["--dataset", "movielens", "--data", "/nonexistent"], "/nonexistent: not a directory"),
        (["--dataset", "interactions", "--data", "{bad}", "--time-col", "when"], "missing column 'when'"),
    ],
)
def test_cli_bad_data_exits_2_with_one_line(
    bentoml_home: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3]}).to_csv(bad, index=False)
    before = sorted(str(m.tag) for m in bentoml.models.list())
    out = run_cli([a.replace("{bad}", str(bad)) for a in args], bentoml_home)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert sorted(str(m.tag) for m in bentoml.models.list()) == before


def test_cli_trains_on_a_generic_file(bentoml_home: Path, tmp_path: Path) -> None:
    """The generic path end to end: a Parquet file with its own column names."""
    from training.datasets import synthetic

    ds = synthetic(n_users=300, n_items=200, n_interactions=12_000, seed=9)
    frame = pd.DataFrame({"who": ds.log.user_ids[ds.log.user], "what": ds.catalog.item_ids[ds.log.item],
                          "when": ds.log.ts})  # fmt: skip
    path = tmp_path / "events.parquet"
    frame.to_parquet(path)
    out = run_cli(["--dataset", "interactions", "--data", str(path), "--user-col", "who",
                   "--item-col", "what", "--time-col", "when", "--dry-run", "--json"], bentoml_home)  # fmt: skip
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)["metrics"]
    assert metrics["model"]["ndcg"] > metrics["baseline_popularity"]["ndcg"]


# ---- the command line as a new user meets it -------------------------------------------


@pytest.fixture(scope="module")
def top_help(bentoml_home: Path) -> str:
    out = run_cli(["--help"], bentoml_home)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize(("command", "summary"), COMMANDS.items(), ids=list(COMMANDS))
def test_top_level_help_lists_every_command(top_help: str, command: str, summary: str) -> None:
    assert re.search(rf"^  {re.escape(command)} +{re.escape(summary)}$", top_help, re.M), top_help
    assert "python -m training [options]" in top_help  # plain training is still the default


@pytest.mark.parametrize("command", COMMANDS)
def test_every_listed_command_runs(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m training {command} ")


@pytest.mark.parametrize(
    ("word", "hint"), [("frobnicate", ""), ("model", " (did you mean 'models'?)")], ids=["unknown", "typo"]
)
def test_unknown_command_names_the_valid_ones(bentoml_home: Path, word: str, hint: str) -> None:
    out = run_cli([word, "--json"], bentoml_home)
    assert out.returncode == 2
    valid = "models, retrain, replay, drift-report, generate, loop"
    assert out.stderr.splitlines()[-1] == f"python -m training: error: unknown command '{word}'; valid: {valid}{hint}"
    assert "unrecognized arguments" not in out.stderr


@pytest.mark.parametrize("retrain", [False, True], ids=["train", "retrain"])
@pytest.mark.parametrize(("argv", "budget"), [([], TrainConfig().tune_budget_s), (["--tune-budget", "0"], 0.0),
                                              (["--tune-budget", "12.5"], 12.5)])  # fmt: skip
def test_the_tune_budget_reaches_the_config(retrain: bool, argv: list[str], budget: float) -> None:
    config = train_config(build_parser(retrain).parse_args([*argv, "--max-depth", "3"]))
    assert config.tune_budget_s == budget
    assert config.ranker.max_depth == 3  # the base of the search


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "soon"])
def test_a_bad_tune_budget_exits_2_naming_it(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--tune-budget", bad])
    assert info.value.code == 2
    assert f"argument --tune-budget: '{bad}' is not a number of seconds >= 0" in capsys.readouterr().err


def _parsers() -> dict[str, argparse.ArgumentParser]:
    settings = RecsysSettings()
    found = {"": build_parser(), "retrain": build_parser(retrain=True), "models": models_parser(),
             "replay": replay.build_parser(settings), "drift-report": drift_report.build_parser(settings),
             "generate": generate_parser()}  # fmt: skip
    sub = next(a for a in found["models"]._actions if isinstance(a, argparse._SubParsersAction))
    found.update({f"models {name}": p for name, p in sub.choices.items()})
    return found


PARSERS = _parsers()
DANGLING = {"a", "an", "and", "or", "the", "of", "to", "it", "with", "for", "by", "than"}


@pytest.mark.parametrize("command", PARSERS, ids=lambda c: c or "train")
def test_help_texts_are_whole_sentences(command: str) -> None:
    """Descriptions end with a full stop; option help does not stop at a colon or a dangling word."""
    parser = PARSERS[command]
    assert parser.description and parser.description.rstrip().endswith("."), parser.description
    for action in parser._actions:
        text = (action.help or "x").strip()
        last = text.split()[-1].lower()
        assert text[-1] not in ":,;(" and last not in DANGLING, f"{command} {action.dest}: {text!r}"
    parser.format_help()


@pytest.fixture(scope="module")
def compared() -> tuple[str, str]:
    """Two versions with different data and ranker depth: the diff has something to show."""
    tags = []
    for seed, depth in ((3, 4), (4, 3)):
        ranker = dataclasses.replace(RankerParams(), max_depth=depth, n_estimators=40)
        data = synthetic(n_users=300, n_items=200, n_interactions=12_000, seed=seed)
        tags.append(train(data, TrainConfig(ranker=ranker, tune_budget_s=0), model_name="recsys-cli-cmp").tag)
    assert all(tags)
    return str(tags[0]), str(tags[1])


def _cell_starts(line: str) -> list[int]:
    """Where each cell of an aligned row begins (cells are apart by two spaces or more)."""
    return [0] + [m.start() for m in re.finditer(r"(?<=  )\S", line)]


def _table(text: str, header: str) -> list[str]:
    """The aligned block of `text` that starts with the line beginning `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    block = lines[start:]
    return block[: block.index("")] if "" in block else block


@pytest.mark.parametrize(
    ("command", "header", "row"),
    [(["show", "{a}"], "metrics@10", "model"), (["compare", "{a}", "{b}"], "metric", "model.ndcg")],
    ids=["show", "compare"],
)
def test_models_show_and_compare_print_aligned_tables(
    bentoml_home: Path, compared: tuple[str, str], command: list[str], header: str, row: str
) -> None:
    a, b = compared
    args = ["models", *(w.format(a=a, b=b) for w in command), "--name", "recsys-cli-cmp"]
    text = run_cli(args, bentoml_home)
    assert text.returncode == 0, text.stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.stdout)
    assert a in text.stdout
    table = _table(text.stdout, header)
    assert len(table) > 2 and any(line.startswith(f"{row} ") for line in table)
    assert {tuple(_cell_starts(line)) for line in table} == {tuple(_cell_starts(table[0]))}, "\n".join(table)
    if command[0] == "compare":
        assert re.search(r"^ranker\.max_depth +4 +3$", text.stdout, re.M), text.stdout
    # --json is what it was: one line, the command's own record.
    machine = run_cli([*args, "--json"], bentoml_home)
    assert machine.returncode == 0, machine.stderr
    expected = cmd_show(a, "recsys-cli-cmp") if command[0] == "show" else cmd_compare(a, b, "recsys-cli-cmp")
    assert machine.stdout == json.dumps(expected, default=str) + "\n"


@pytest.fixture(scope="module")
def local_ranker(trained: TrainResult) -> LocalRanker:
    assert trained.tag is not None
    version = open_version(trained.tag)
    return LocalRanker(Recommender.of(version), version.load_booster(1))


@pytest.mark.parametrize(
    ("logged", "reason", "unknown"),
    [
        (LoggedRequest("recommend", {"user_id": "u1", "k": 3, "exclude_seen": True}, ["i1", "zz-gone", "i2"]),
         "served_items_unknown", ["zz-gone"]),
        (LoggedRequest("rank", {"user_id": "u1", "item_ids": ["i1", "zz-new"]}, ["zz-new", "i1"]),
         "requested_items_unknown", ["zz-new"]),
        (LoggedRequest("score", {"user_id": "u1"}, []), "endpoint_not_replayable", []),
    ],
    ids=["served items", "requested items", "endpoint"],
)  # fmt: skip
def test_replay_says_why_a_request_is_not_comparable(
    local_ranker: LocalRanker, logged: LoggedRequest, reason: str, unknown: list[str]
) -> None:
    fine = LoggedRequest("recommend", {"user_id": "u2", "k": 3, "exclude_seen": True}, ["i1", "i2", "i3"])
    result = replay_requests([logged, logged, fine] if logged.endpoint == "recommend" else [logged, logged],
                             local_ranker)[logged.endpoint]  # fmt: skip
    assert result["not_comparable"] == 2 and result["not_comparable_reasons"] == {reason: 2}
    assert result["unknown_id_examples"].get(reason, []) == unknown
    line = not_comparable_line(result)
    assert line.startswith(f"not comparable: 2 of {result['requests']} (2: {NOT_COMPARABLE[reason]}")


def test_replay_cli_prints_the_reasons(bentoml_home: Path, trained: TrainResult, tmp_path: Path) -> None:
    logs = tmp_path / "monitoring"
    (logs / REQUEST_LOG / "data").mkdir(parents=True)
    records = [{"model_version": trained.tag, "endpoint": "recommend", "items": ["i1", f"zz{u}"],
                "request": {"user_id": f"u{u}", "k": 2, "exclude_seen": True}} for u in range(4)]  # fmt: skip
    records.append({"model_version": trained.tag, "endpoint": "recommend", "items": ["i1", "i2"],
                    "request": {"user_id": "nobody", "k": 2, "exclude_seen": True}})  # fmt: skip
    (logs / REQUEST_LOG / "data" / "data.1.log").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["replay", "--logs", str(logs), "--champion", str(trained.tag), "--challenger", str(trained.tag)]
    out = run_cli(args, bentoml_home)
    assert out.returncode == 0, out.stderr
    assert ("recommend: not comparable: 4 of 5 (4: items the champion returned are unknown to the challenger's "
            "catalog, e.g. zz0, zz1, zz2)") in out.stdout  # fmt: skip
    assert "recommend: 1 of 5 requests are for users the challenger does not know" in out.stdout
    summary = json.loads(run_cli([*args, "--json"], bentoml_home).stdout)["endpoints"]["recommend"]
    assert (summary["not_comparable"], summary["not_comparable_reasons"]) == (4, {"served_items_unknown": 4})
