"""The seeds' presets: each builds a workflow, and one runs end to end beside its twin."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from leukflow.core.config import validate_config
from leukflow.evaluate.compare import compare_figures

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "config" / "presets").glob("s*.yaml"))


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--cores", "2", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900)


def test_there_is_a_preset_per_seed():
    assert [p.stem for p in PRESETS] == ["s0", "s1", "s2", "s3", "s4"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid_and_reproduces_the_papers_figures_with_a_twin(preset):
    config = validate_config(yaml.safe_load(preset.read_text()), check_paths=False)
    assert config["folds"]["twin"]  # every preset runs its honest twin
    assert config["folds"]["protocol"] == "grouped"
    published = config["evaluation"]["published"]
    assert published
    models = {*config["encoders"], "ensemble"}
    for entry in published:
        assert 0.8 < entry["value"] <= 1.0  # the seeds' reported 88-100%
        assert entry["encoder"] in models
        assert entry["classifier"] in {*config["classifiers"], *config["evaluation"]["ensembles"]}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_with_a_user_dataset_file_builds_the_workflow(preset, tmp_path):
    user = {"results_dir": "out", "datasets": {"mine": {"format": "demo", "root": "demo"}}}
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(user))
    run = snakemake(tmp_path, "-n", "--configfile", str(preset), "my.yaml")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    out = run.stdout + run.stderr
    assert "compare_to_papers" in out
    assert "out/segment/mine_random/" in out  # the leaky twin of the user's dataset


def _metrics_row(dataset, encoder, classifier, value, low, high, leaky):
    return {"dataset": dataset, "encoder": encoder, "classifier": classifier, "level": "roi",
            "fold": "pooled", "leaky": leaky, "accuracy": value, "metric": "accuracy",
            "ci_low": low, "ci_high": high}  # fmt: skip


def test_compare_figures_puts_paper_leaky_and_grouped_side_by_side():
    metrics = pd.DataFrame(
        [
            _metrics_row("d", "honest", "knn", 0.7, 0.6, 0.8, False),
            _metrics_row("d_random", "pub", "knn", 0.95, 0.9, 0.99, True),
            _metrics_row("d_random", "honest", "knn", 0.9, 0.85, 0.95, True),
            _metrics_row("d", "pub", "knn", 0.92, 0.9, 0.94, True),  # all_labels: still leaky
            {**_metrics_row("d", "pub", "knn", 0.5, 0, 1, True), "fold": "mean"},
        ]
    )
    entry = {"method": "S0 KNN", "metric": "accuracy", "value": 0.98, "encoder": "pub",
             "classifier": "knn", "level": "roi"}  # fmt: skip
    twins, protocols = {"d_random": "d"}, {"d": "grouped", "d_random": "random"}
    table = compare_figures(
        metrics, published=[{**entry, "honest_encoder": "honest"}], twins=twins,
        protocols=protocols,
    )  # fmt: skip
    row = table.iloc[0]
    assert (row["method"], row["dataset"], row["paper"]) == ("S0 KNN", "d", 0.98)
    assert (row["leaky"], row["leaky_ci_low"], row["leaky_ci_high"]) == (0.95, 0.9, 0.99)
    assert (row["grouped"], row["grouped_ci_low"], row["grouped_ci_high"]) == (0.7, 0.6, 0.8)
    assert row["grouped_is_honest"]
    # without an honest encoder the grouped figure is the published encoder's, flagged leaky
    row = compare_figures(
        metrics, published=[{**entry, "honest_encoder": ""}], twins=twins, protocols=protocols
    ).iloc[0]
    assert row["grouped"] == 0.92
    assert not row["grouped_is_honest"]
    # no twin and no paper: every model, its protocol's side only
    table = compare_figures(metrics[metrics["dataset"] == "d"], published=[], twins={},
                            protocols={"d": "grouped"})  # fmt: skip
    assert sorted(table["encoder"]) == ["honest", "pub"]
    assert table["paper"].isna().all()
    assert table["leaky"].isna().all()


@pytest.mark.e2e
def test_s2_preset_runs_end_to_end_beside_its_honest_twin(tmp_path):
    user = {
        "results_dir": "out",
        "datasets": {"demo": {"format": "demo", "root": "demo", "n_fields": 8,
                              "fields_per_patient": 2, "seed": 0}},
        "segmentation": {"roi_size_px": 32},
        "folds": {"k": 2},
        "encoders": {"small_cnn": {"epochs": 1, "batch_size": 16}},
        "evaluation": {"n_boot": 200},
    }  # fmt: skip
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(user))
    preset = REPO / "config" / "presets" / "s2.yaml"
    run = snakemake(tmp_path, "--configfile", str(preset), "my.yaml")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    folds = pd.read_csv(out / "folds.csv")
    assert set(folds["dataset"]) == {"demo", "demo_random"}
    assert folds.groupby("dataset")["leaky"].all().to_dict() == {
        "demo": False,
        "demo_random": True,
    }
    assert (folds[folds["dataset"] == "demo"].groupby("patient")["fold"].nunique() == 1).all()
    # the demo's fields are all distinct: the twin's images are not paired with their copies
    assert pd.read_csv(out / "duplicates.csv").empty
    assert (
        folds[folds["dataset"] == "demo_random"].groupby("patient")["fold"].nunique() > 1
    ).any()
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["classifier"]) == {"cnn_softmax"}
    pooled = metrics[(metrics["fold"] == "pooled") & (metrics["metric"] == "accuracy")]
    pooled = pooled[pooled["level"] == "roi"].set_index("dataset")
    # the head's calls are scored like any classifier's: 8 fields, one central cell each
    preds = pd.read_parquet(out / "evaluate/demo/small_cnn/cnn_softmax/roi_predictions.parquet")
    assert set(preds["classifier"]) == {"cnn_softmax"}
    assert len(preds) == pooled.loc["demo", "n"]
    assert pooled.loc["demo", "accuracy"] == pytest.approx(
        (preds["pred"] == preds["label"]).mean()
    )
    np.testing.assert_allclose(preds.filter(like="proba_").sum(axis=1), 1.0, atol=1e-5)
    table = pd.read_csv(out / "comparison.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["method"], row["dataset"], row["paper"]) == ("S2 custom CNN", "demo", 1.0)
    assert row["leaky"] == pytest.approx(pooled.loc["demo_random", "accuracy"])
    assert row["grouped"] == pytest.approx(pooled.loc["demo", "accuracy"])
    for side in ("leaky", "grouped"):
        assert row[f"{side}_ci_low"] <= row[side] <= row[f"{side}_ci_high"]
    assert row["grouped_is_honest"]
    assert (out / "comparison.png").stat().st_size > 5000
    assert (out / "plots/demo_random/small_cnn/cnn_softmax_roc.png").exists()
