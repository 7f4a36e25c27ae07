"""Compare: the papers' reported figures beside leukflow's leaky and honest ones.

A dataset run under ``folds.twin`` exists twice: under the ``random``
protocol (the seeds' leaky split: crops of one smear on both sides) and under
``grouped`` (no patient on both sides). For each method a preset reproduces,
:func:`compare_figures` puts side by side the figure the paper reported,
leukflow's figure under the paper's leaky protocol and leukflow's honest
figure, each of leukflow's with its bootstrap interval over patient groups.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from leukflow.core.figures import subplots
from leukflow.data.io import atomic_path
from leukflow.evaluate.reliance import without_reliance

log = logging.getLogger(__name__)

COLUMNS = [
    "method", "dataset", "encoder", "classifier", "level", "metric", "paper",
    "leaky", "leaky_ci_low", "leaky_ci_high",
    "grouped", "grouped_ci_low", "grouped_ci_high", "grouped_is_honest",
    "cell_only", "cell_only_ci_low", "cell_only_ci_high",
    "background_only", "background_only_ci_low", "background_only_ci_high",
]  # fmt: skip


def _pooled(metrics: pd.DataFrame) -> pd.DataFrame:
    """Pooled rows, one per dataset, encoder, classifier, level and metric: value, CI, leaky."""
    metrics = without_reliance(metrics)
    pooled = metrics[metrics["fold"].astype(str) == "pooled"].copy()
    pooled["value"] = [row[m] for m, (_, row) in zip(pooled["metric"], pooled.iterrows(),
                                                     strict=True)]  # fmt: skip
    keys = ["dataset", "encoder", "classifier", "level", "metric"]
    return pooled.set_index(keys)[["value", "ci_low", "ci_high", "leaky"]]


def compare_figures(
    metrics: pd.DataFrame,
    *,
    published: Sequence[Mapping],
    twins: Mapping[str, str],
    protocols: Mapping[str, str],
    controls: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """One row per reproduced method and dataset: paper, leaky and grouped figures.

    Parameters
    ----------
    metrics : pandas.DataFrame
        metrics.csv (``dataset, encoder, classifier, level, fold, leaky``, the
        metrics, ``metric, ci_low, ci_high``).
    published : sequence of mapping
        ``method, metric, value`` (the paper's figure, 0..1), ``encoder,
        classifier, level`` (leukflow's run of the method) and
        ``honest_encoder`` (the encoder of the grouped figure; ``""``: the
        same). Empty: a row for every encoder, classifier and level, on
        accuracy, without a paper figure.
    twins : mapping
        Twin dataset -> the dataset it copies (``folds.twin``).
    protocols : mapping
        Dataset -> ``grouped`` or ``random``.
    controls : mapping, optional
        Shortcut-control dataset -> ``(dataset, kind)``, kind ``cell_only`` or
        ``background_only`` (``evaluation.shortcut_controls``).

    Returns
    -------
    pandas.DataFrame
        :data:`COLUMNS`. ``dataset`` is the user's dataset name; ``leaky`` is
        the pooled figure under the random protocol, ``grouped`` under the
        grouped one (NaN when that protocol did not run), each with its
        interval; ``grouped_is_honest`` is False when the grouped figure is
        still marked leaky (e.g. an encoder trained on every ROI).
        ``cell_only`` and ``background_only`` are the same model's pooled figure
        on the dataset's shortcut controls (NaN without controls), each with
        its interval.
    """
    pooled = _pooled(metrics)
    sides = {}  # base dataset -> {protocol: dataset}
    for dataset, protocol in protocols.items():
        sides.setdefault(twins.get(dataset, dataset), {})[protocol] = dataset
    entries = list(published)
    if not entries:
        combos = pooled.reset_index()[["encoder", "classifier", "level"]].drop_duplicates()
        entries = [
            {"method": "", "metric": "accuracy", "value": None, "honest_encoder": "", **combo}
            for combo in combos.to_dict("records")
        ]
    rows = []
    for entry in entries:
        for base, by_protocol in sides.items():
            row = {
                "method": entry["method"],
                "dataset": base,
                "encoder": entry["encoder"],
                "classifier": entry["classifier"],
                "level": entry["level"],
                "metric": entry["metric"],
                "paper": np.nan if entry["value"] is None else float(entry["value"]),
            }
            for side in ("random", "grouped"):
                encoder = entry["encoder"]
                if side == "grouped" and entry.get("honest_encoder"):
                    encoder = entry["honest_encoder"]
                found = _find(pooled, by_protocol.get(side), encoder, entry)
                _put(row, "leaky" if side == "random" else "grouped", found)
                if side == "grouped":
                    row["grouped_is_honest"] = found is not None and not bool(found["leaky"])
            for control, (of, kind) in (controls or {}).items():
                if of != base:
                    continue
                encoder = entry.get("honest_encoder") or entry["encoder"]
                _put(row, kind, _find(pooled, control, encoder, entry))
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def _find(
    pooled: pd.DataFrame, dataset: str | None, encoder: str, entry: Mapping
) -> pd.Series | None:
    """Find the pooled metric row of a dataset and encoder for an entry's model, or None."""
    key = (dataset, encoder, entry["classifier"], entry["level"], entry["metric"])
    return pooled.loc[key] if key in pooled.index else None


def _put(row: dict, name: str, found: pd.Series | None) -> None:
    """Set ``name``, ``name_ci_low`` and ``name_ci_high`` of ``row`` (NaN when not found)."""
    for col, src in ((name, "value"), (f"{name}_ci_low", "ci_low"),
                     (f"{name}_ci_high", "ci_high")):  # fmt: skip
        row[col] = np.nan if found is None else float(found[src])


def plot_comparison(comparison: pd.DataFrame, path: str | Path) -> None:
    """Paper (star), leaky (orange), grouped (blue) and control figures with their intervals."""
    n = max(len(comparison), 1)
    fig, ax = subplots(figsize=(8, 2.0 + 0.45 * n))
    y = np.arange(len(comparison))[::-1]
    sides = [(0.12, "leaky", "tab:orange"), (-0.12, "grouped", "tab:blue")]
    for side, offset, colour in (("cell_only", -0.24, "tab:green"),
                                 ("background_only", -0.36, "tab:red")):  # fmt: skip
        if side in comparison and comparison[side].notna().any():
            sides.append((offset, side, colour))
    names = {"leaky": "random split (leaky)", "grouped": "grouped",
             "cell_only": "grouped, cell only (control)",
             "background_only": "grouped, background only (control)"}  # fmt: skip
    for offset, side, colour in sides:
        value = comparison[side].to_numpy(float)
        err = np.abs(
            np.vstack(
                [value - comparison[f"{side}_ci_low"], comparison[f"{side}_ci_high"] - value]
            )
        )
        ax.errorbar(value, y + offset, xerr=np.nan_to_num(err), fmt="o", color=colour,
                    label=f"leukflow, {names[side]}")  # fmt: skip
    ax.scatter(comparison["paper"], y, marker="*", s=120, color="black", label="paper", zorder=3)
    labels = [
        f"{r.method or r.encoder + '/' + r.classifier} [{r.dataset}, {r.level} {r.metric}]"
        for r in comparison.itertuples()
    ]
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("pooled out-of-fold figure (95% bootstrap CI over patient groups)")
    ax.set_xlim(0, 1.02)
    ax.legend(loc="best", fontsize=8, framealpha=0.7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
