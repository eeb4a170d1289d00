"""Model lifecycle commands over the registry (models/lifecycle/registry.py):

    python -m training models list|show|compare|promote|rollback|clear-challenger|history
    python -m training retrain --dataset ... [--margin M]   (see `decide`)

Versions can be named by exact tag, by `name:latest`, or by a stage (`champion`,
`challenger`, or `name:champion`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

import bentoml
from bentoml.exceptions import NotFound

from models.lifecycle import registry
from models.lifecycle.registry import ALIASES, STAGES, RegistryError
from models.lifecycle.store import ModelCheckError
from models.serving.settings import RecsysSettings
from training import ab_report
from training.tracking import flatten

COMPARED_METRICS = ("ndcg", "recall", "hitrate", "map")


def resolve_ref(ref: str, default_name: str) -> str:
    """An exact tag for `ref`: a stage or `latest` (of `default_name` or of `name:`), or a tag."""
    name, _, version = ref.rpartition(":") if ":" in ref else (default_name, "", ref)
    if version in ALIASES:
        try:
            return registry.resolve_alias(name, version)
        except ModelCheckError as err:
            raise RegistryError(str(err)) from err
    return registry.exact_tag(ref)


@dataclass(frozen=True)
class Decision:
    """The outcome of a retraining run's gate on NDCG@k over the same fresh hold-out."""

    promote: bool
    challenger_ndcg: float
    champion_ndcg: float | None
    margin: float
    reason: str

    def as_record(self) -> dict[str, Any]:
        return {"promote": self.promote, "challenger_ndcg": self.challenger_ndcg,
                "champion_ndcg": self.champion_ndcg, "margin": self.margin, "reason": self.reason}  # fmt: skip


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None, margin: float) -> Decision:
    """Promote unless the challenger's NDCG@k is below the champion's by more than `margin`.
    The challenger must also beat its own co-occurrence baseline: a model that learned
    nothing ranks no better than its candidate order."""
    ndcg = float(challenger["model"]["ndcg"])
    baseline = float(challenger["baseline_cooccurrence"]["ndcg"])
    if ndcg <= baseline:
        return Decision(False, ndcg, _ndcg(champion), margin,
                        f"NDCG {ndcg:.4f} does not beat the co-occurrence baseline {baseline:.4f}")  # fmt: skip
    if champion is None:
        return Decision(True, ndcg, None, margin, "no champion yet")
    best = _ndcg(champion)
    assert best is not None
    if ndcg < best - margin:
        return Decision(False, ndcg, best, margin,
                        f"NDCG {ndcg:.4f} < champion {best:.4f} - margin {margin}")  # fmt: skip
    return Decision(True, ndcg, best, margin, f"NDCG {ndcg:.4f} >= champion {best:.4f} - margin {margin}")


def _ndcg(metrics: dict[str, Any] | None) -> float | None:
    return None if metrics is None else float(metrics["model"]["ndcg"])


# ---- models ... ------------------------------------------------------------------------


def _summary(model: bentoml.Model, reg: registry.Registry) -> dict[str, Any]:
    meta = model.info.metadata
    metrics = meta.get("metrics", {})
    return {
        "tag": str(model.tag),
        "stage": reg.stage_of(str(model.tag)),
        "created": model.info.creation_time.isoformat(timespec="seconds"),
        "dataset": meta.get("dataset", {}).get("name"),
        "data_hash": meta.get("dataset", {}).get("content_hash"),
        "ndcg": metrics.get("model", {}).get("ndcg"),
        "baseline_cooccurrence_ndcg": metrics.get("baseline_cooccurrence", {}).get("ndcg"),
        "schema_hash": meta.get("schema_hash"),
    }


def cmd_list(name: str) -> list[dict[str, Any]]:
    reg = registry.load(name)
    try:
        models = bentoml.models.list(name)
    except NotFound:
        models = []
    return [_summary(m, reg) for m in sorted(models, key=lambda m: m.info.creation_time, reverse=True)]


def _local_model(tag: str) -> bentoml.Model:
    """The stored version; one trained on another machine is fetched first (and checked)."""
    try:
        return bentoml.models.get(tag)
    except NotFound:
        registry.ensure_local(tag)
        return bentoml.models.get(tag)


def cmd_show(ref: str, name: str) -> dict[str, Any]:
    model = _local_model(resolve_ref(ref, name))
    return {**_summary(model, registry.load(str(model.tag.name))), "labels": dict(model.info.labels),
            "metadata": model.info.metadata}  # fmt: skip


def cmd_compare(a_ref: str, b_ref: str, name: str) -> dict[str, Any]:
    """B against A: metric deltas, feature-schema differences, parameter differences."""
    a, b = (_local_model(resolve_ref(r, name)) for r in (a_ref, b_ref))
    ma, mb = a.info.metadata, b.info.metadata
    deltas = {}
    for key in ("model", "baseline_cooccurrence", "baseline_popularity"):
        for metric in COMPARED_METRICS:
            va, vb = ma["metrics"][key][metric], mb["metrics"][key][metric]
            deltas[f"{key}.{metric}"] = {"a": va, "b": vb, "delta": vb - va}
    fa = {f["name"]: f for f in ma["feature_schema"]}
    fb = {f["name"]: f for f in mb["feature_schema"]}
    schema = {
        "same": ma["schema_hash"] == mb["schema_hash"],
        "added": sorted(set(fb) - set(fa)),
        "removed": sorted(set(fa) - set(fb)),
        "changed": sorted(n for n in set(fa) & set(fb) if fa[n] != fb[n]),
        "order_changed": [f for f in fa if f in fb] != [f for f in fb if f in fa],
    }
    pa, pb = flatten(ma["params"]), flatten(mb["params"])
    params = {k: {"a": pa.get(k), "b": pb.get(k)} for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)}
    same_data = ma["dataset"]["content_hash"] == mb["dataset"]["content_hash"]
    return {"a": str(a.tag), "b": str(b.tag), "metrics": deltas, "schema": schema, "params": params,
            "same_data": same_data}  # fmt: skip


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def _param(value: Any) -> str:
    return "-" if value is None else str(value)  # as configured: 0.05, not 0.0500


def _aligned(rows: list[list[str]], indent: str = "") -> str:
    """Rows of cells as left-aligned columns (the last column unpadded)."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    return "\n".join(indent + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no versions")
        return
    cols = ("tag", "stage", "created", "dataset", "ndcg", "baseline_cooccurrence_ndcg")
    print(_aligned([list(cols), *([_cell(r[c]) for c in cols] for r in rows)]))


METRIC_ROWS = ("model", "baseline_cooccurrence", "baseline_popularity")


def show_text(shown: dict[str, Any]) -> str:
    """`models show` for people: the version, its data, metrics and parameters (`--json`: all)."""
    meta = shown["metadata"]
    data = meta.get("dataset", {})
    metrics = meta.get("metrics", {})
    data_hash = f"hash {_cell(shown['data_hash'])}"
    sizes = ", ".join(f"{data[k]:,} {k[2:]}" for k in ("n_interactions", "n_users", "n_items") if k in data)
    head = [
        ["tag", shown["tag"]],
        ["stage", _cell(shown["stage"])],
        ["created", shown["created"]],
        ["dataset", f"{_cell(shown['dataset'])} ({'; '.join(filter(None, (sizes, data_hash)))})"],
        ["schema", f"{_cell(shown['schema_hash'])} ({len(meta.get('feature_schema', []))} features)"],
        ["labels", " ".join(f"{k}={v}" for k, v in shown["labels"].items()) or "-"],
        ["code", _cell(meta.get("code_version"))],
    ]
    parts = [_aligned(head)]
    present = [r for r in METRIC_ROWS if r in metrics]
    if present:
        table = [[f"metrics@{metrics.get('k', '?')}", *COMPARED_METRICS]]
        table += [[r, *(_cell(metrics[r].get(m)) for m in COMPARED_METRICS)] for r in present]
        parts.append(_aligned(table))
        parts.append(f"candidate recall: {_cell(metrics.get('candidate_recall'))}; "
                     f"test users: {_cell(metrics.get('test_users'))}")  # fmt: skip
    params = flatten(meta.get("params", {}))
    if params:
        parts.append("params\n" + _aligned([[k, _param(v)] for k, v in params.items()], indent="  "))
    return "\n\n".join(parts)


def compare_text(diff: dict[str, Any]) -> str:
    """`models compare` for people: metric deltas, then what differs (`--json`: the same, as data)."""
    rows = [["metric", "a", "b", "delta"]]
    rows += [[k, _cell(v["a"]), _cell(v["b"]), f"{v['delta']:+.4f}"] for k, v in diff["metrics"].items()]
    schema = diff["schema"]
    if schema["same"]:
        schema_line = "same"
    else:
        changes = [f"{what} {', '.join(schema[what])}" for what in ("added", "removed", "changed")
                   if schema[what]]  # fmt: skip
        changes += ["order changed"] if schema["order_changed"] else []
        schema_line = "; ".join(changes) or "hash differs"
    data_line = "same" if diff["same_data"] else "different"
    parts = [_aligned([["a", diff["a"]], ["b", diff["b"]]]), _aligned(rows),
             _aligned([["schema", schema_line], ["data", data_line]])]  # fmt: skip
    if diff["params"]:
        params = [[k, _param(v["a"]), _param(v["b"])] for k, v in diff["params"].items()]
        parts.append(_aligned([["param", "a", "b"], *params]))
    else:
        parts.append("params: same")
    return "\n\n".join(parts)


def models_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=None, help="model name (default: RECSYS_MODEL_NAME)")
    common.add_argument("--json", action="store_true", help="JSON on stdout (for scripts)")
    p = argparse.ArgumentParser(prog="python -m training models", description="Model versions and stages.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str, *positional: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_, description=f"{help_[0].upper()}{help_[1:]}.", parents=[common])
        for arg in positional:
            cmd.add_argument(arg, help="a tag (name:version), name:latest, or a stage (champion, challenger)")
        return cmd

    add("list", "versions, newest first, with metrics and stage")
    add("show", "one version", "ref")
    add("compare", "B against A: metric deltas, schema and parameter diff", "a", "b")
    add("promote", "make a version the champion (or the challenger)", "ref").add_argument(
        "--stage", choices=STAGES, default="champion", help="the stage to give it (default: champion)"
    )
    add("rollback", "make the previous champion the champion again")
    add("clear-challenger", "remove the challenger stage")
    add("history", "promotions, rollbacks and retraining decisions")
    ab_report.add_arguments(add("ab-report", "challenger against champion on the event log: online metrics, "
                                "differences with CIs, the minimum sample"), RecsysSettings())  # fmt: skip
    return p


def models_main(argv: list[str]) -> int:
    args = models_parser().parse_args(argv)
    name = args.name or RecsysSettings().model_name
    out: Any
    if args.command == "ab-report":
        return ab_report.run(args)
    if args.command == "list":
        out = cmd_list(name)
        if not args.json:
            _print_table(out)
            return 0
    elif args.command in ("show", "compare"):
        out = cmd_show(args.ref, name) if args.command == "show" else cmd_compare(args.a, args.b, name)
        if not args.json:
            print(show_text(out) if args.command == "show" else compare_text(out))
            return 0
    elif args.command == "promote":
        reg = registry.promote(resolve_ref(args.ref, name), args.stage)
        out = {"champion": reg.champion, "challenger": reg.challenger}
    elif args.command == "rollback":
        reg = registry.rollback(name)
        out = {"champion": reg.champion, "challenger": reg.challenger}
    elif args.command == "clear-challenger":
        reg = registry.clear_challenger(name)
        out = {"champion": reg.champion, "challenger": reg.challenger}
    else:
        out = registry.load(name).events
    print(json.dumps(out, indent=None if args.json else 2, default=str))
    return 0

