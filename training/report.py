"""The training report saved inside each model version: PNGs a person can look at."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

NDCG_PNG = "report_validation_ndcg.png"
IMPORTANCE_PNG = "report_feature_importance.png"


def write_report(
    folder: Path, curve: list[float], best_round: int, importance: dict[str, float], k: int
) -> list[str]:
    """Validation NDCG@k per boosting round and gain importance per feature."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(curve) + 1), curve, label=f"validation NDCG@{k}")
    ax.axvline(best_round + 1, color="grey", linestyle="--", label=f"kept: {best_round + 1} rounds")
    ax.set_xlabel("boosting round")
    ax.set_ylabel(f"NDCG@{k}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / NDCG_PNG, dpi=100)
    plt.close(fig)

    names = sorted(importance, key=importance.__getitem__)
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(names) + 1))
    ax.barh(names, [importance[n] for n in names])
    ax.set_xlabel("total gain")
    ax.set_title("feature importance")
    fig.tight_layout()
    fig.savefig(folder / IMPORTANCE_PNG, dpi=100)
    plt.close(fig)
    return [NDCG_PNG, IMPORTANCE_PNG]
