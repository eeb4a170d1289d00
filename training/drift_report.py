"""Offline drift report: read what the service logged through `bentoml.monitor`, compare it
with a model version's reference profile, and write one self-contained HTML page with the
reference and current histogram of every feature and of the score.

    python -m training drift-report --logs monitoring --model recsys-ranker:latest --out drift.html
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.core.drift import INSUFFICIENT, ReferenceProfile, frequencies, ks_binned, min_sample, psi, status
from models.core.schema import FEATURES, N_FEATURES
from models.lifecycle.registry import resolve_alias
from models.lifecycle.store import open_version
from models.serving.monitoring import MONITOR_NAME, logged_records
from models.serving.settings import RecsysSettings

DESCRIPTION = ("Compare what the service logged (bentoml.monitor) with a model version's reference "
               "profile and write one self-contained HTML page: PSI and the reference and current "
               "histogram of every feature and of the score.")  # fmt: skip


@dataclass(frozen=True)
class LoggedTraffic:
    features: np.ndarray
    scores: np.ndarray
    requests: int
    cold: int
    scored: int  # requests that logged feature rows
    online: int  # requests that used the user's online events


def read_logs(logs: Path, model_tag: str) -> LoggedTraffic:
    """Every logged request of `model_tag` under `logs` (the monitor's log_path)."""
    rows: list[list[float]] = []
    scores: list[float] = []
    requests = cold = scored = online = 0
    for record in logged_records(logs, MONITOR_NAME, model_tag):
        requests += 1
        cold += bool(record.get("cold_start"))
        features = record.get("features") or []
        scored += bool(features)
        online += bool(record.get("online_items"))  # absent in logs of older services
        rows.extend(features)
        scores.extend(record.get("scores") or [])
    matrix = np.asarray(rows, dtype=np.float32).reshape(-1, N_FEATURES)
    return LoggedTraffic(matrix, np.asarray(scores, dtype=np.float32), requests, cold, scored, online)


def _histogram_png(name: str, edges: list[float], reference: list[float], current: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"≤ {edges[0]:.3g}"] if edges else ["all"]
    labels += [f"{a:.3g} – {b:.3g}" for a, b in itertools.pairwise(edges)]
    if edges:
        labels.append(f"> {edges[-1]:.3g}")
    x = np.arange(len(reference))
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.bar(x - 0.2, reference, width=0.4, label="reference")
    ax.bar(x + 0.2, current, width=0.4, label="current")
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_report(profile: ReferenceProfile, traffic: LoggedTraffic, model_tag: str, out: Path,
                 warn: float, alert: float, min_rows: int | None = None) -> dict[str, dict[str, float | str]]:  # fmt: skip
    """Write the HTML page; return {name: {psi, status, n}} for every feature and the score.
    A statistic whose sample (rows; logged requests for user features, whose rows repeat one
    user) is below `min_rows` (None: min_sample of its bins) is insufficient_data."""
    results: dict[str, dict[str, float | str]] = {}
    sections = []
    rows = len(traffic.scores)
    columns = [(f.name, profile.feature_edges[j], profile.feature_freqs[j], traffic.features[:, j],
                min(rows, traffic.scored) if f.group == "user" else rows)
               for j, f in enumerate(FEATURES)]  # fmt: skip
    columns.append(("score", profile.score_edges, profile.score_freqs, traffic.scores, rows))
    for name, edges, ref, values, n in columns:
        current = frequencies(values, np.asarray(edges)) if len(values) else np.zeros(len(ref))
        value = psi(ref, current * max(len(values), 1))
        needed = min_rows if min_rows is not None else min_sample(len(ref), warn)
        results[name] = {"psi": round(value, 5), "status": status(value, warn, alert, n, needed), "n": n}
        if name == "score":
            results[name]["ks"] = round(ks_binned(np.asarray(ref), current), 5)
        png = _histogram_png(name, edges, ref, current)
        sections.append(f"<h3>{html.escape(name)}: PSI {value:.4f} ({results[name]['status']})</h3>"
                        f'<img src="data:image/png;base64,{png}" alt="{html.escape(name)}">')  # fmt: skip
    table = "".join(f"<tr><td>{html.escape(n)}</td><td>{r['psi']}</td><td>{r['n']}</td><td>{r['status']}</td></tr>"
                    for n, r in results.items())  # fmt: skip
    cold = traffic.cold / traffic.requests if traffic.requests else 0.0
    out.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Drift report</title></head><body>"
        f"<h1>Drift report for {html.escape(model_tag)}</h1>"
        f"<p>{traffic.requests} logged requests, {rows} scored rows; cold-start share "
        f"{cold:.3f} (reference {profile.cold_start_share:.3f}); requests that used online events: "
        f"{traffic.online}. Thresholds: warn {warn}, alert {alert}; below its minimum sample a "
        f"statistic is {INSUFFICIENT}.</p>"
        f"<table border='1'><tr><th>feature</th><th>PSI</th><th>sample</th><th>status</th></tr>{table}</table>"
        + "".join(sections) + "</body></html>"
    )
    return results


def build_parser(settings: RecsysSettings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training drift-report", description=DESCRIPTION)
    p.add_argument("--logs", type=Path, default=settings.monitor_dir, help="the monitor log folder")
    p.add_argument("--model", default=None, help="model tag (default: the RECSYS_MODEL_TAG or the champion)")
    p.add_argument("--out", type=Path, default=Path("drift-report.html"), help="the HTML file to write")
    return p


def main(argv: list[str]) -> int:
    settings = RecsysSettings()
    args = build_parser(settings).parse_args(argv)
    version = open_version(args.model or settings.model_tag or resolve_alias(settings.model_name, "champion"))
    traffic = read_logs(args.logs, version.tag)
    if len(traffic.scores) == 0:
        # No PSI on no rows: a report of zeros would read as a verdict.
        print(f"error: {args.logs}: no logged rows for {version.tag} ({traffic.requests} logged requests, "
              f"none scored; is RECSYS_MONITOR_SAMPLE above 0 and --model the served version?); "
              "no report written", file=sys.stderr)  # fmt: skip
        return 1
    results = write_report(ReferenceProfile.load(version.path), traffic, version.tag, args.out,
                           settings.drift_warn, settings.drift_alert, settings.drift_min_rows)  # fmt: skip
    alerts = [n for n, r in results.items() if r["status"] == "alert"]
    short = [n for n, r in results.items() if r["status"] == INSUFFICIENT]
    if short:  # its own line, first: the last line stays "...; alerts: [...]" for scripts
        print(f"{INSUFFICIENT} (sample below its minimum, not judged): {short}")
    print(f"{args.out}: {traffic.requests} requests, {len(traffic.scores)} rows; alerts: {alerts or 'none'}")
    return 0
