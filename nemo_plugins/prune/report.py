"""The prune report: JSON plus PNG plots (layer scores, PCA explained variance, FFN scores)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return [_layer_plot(report, out), _pca_plot(report, out), _ffn_plot(report, out)]


def _layer_plot(report: dict, out: Path) -> Path:
    scores = report["layers"]["scores"]
    kept = set(report["layers"]["kept"])
    fig, ax = plt.subplots(figsize=(8, 3))
    blocks = range(len(scores))
    ax.plot(blocks, scores, color="lightgray", zorder=1)
    ax.scatter(blocks, scores, c=["tab:blue" if i in kept else "tab:red" for i in blocks], zorder=2)
    ax.set_yscale("log")  # the first block often scales the stream by >10x, the rest by a few percent
    ax.set_xlabel("block")
    ax.set_ylabel("mean ||x_out|| / ||x_in||")
    ax.set_title(f"layer scores ({report['options']['layer_method']}): blue kept, red dropped")
    return _save(fig, out / "layer_scores.png")


def _pca_plot(report: dict, out: Path) -> Path:
    explained = report["hidden"]["explained"]
    k = report["target"]["hidden_size"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(explained) + 1), explained)
    ax.axvline(k, color="tab:red", linestyle="--", label=f"kept {k}: {explained[k - 1]:.3f}")
    ax.set_xlabel("components kept")
    ax.set_ylabel("fraction of norm-input energy kept")
    ax.set_title(f"hidden size ({report['options']['hidden_method']})")
    ax.legend()
    return _save(fig, out / "pca_explained.png")


def _ffn_plot(report: dict, out: Path) -> Path:
    quantiles = report["ffn"]["score_quantiles"]
    kept = report["ffn"]["kept_score_fraction"]
    layers = range(len(quantiles))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.fill_between(layers, [q[0] for q in quantiles], [q[2] for q in quantiles], alpha=0.3, label="10-90%")
    left.plot(layers, [q[1] for q in quantiles], label="median")
    left.set_yscale("log")
    left.set_xlabel("block")
    left.set_ylabel("mean |silu(W1 x) * W3 x|")
    left.legend()
    right.plot(layers, kept, marker="o")
    right.set_ylim(0, 1)
    right.set_xlabel("block")
    right.set_ylabel("score mass kept")
    fig.suptitle(f"FFN channels: keep {report['target']['ffn_hidden_size']}")
    return _save(fig, out / "ffn_scores.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
