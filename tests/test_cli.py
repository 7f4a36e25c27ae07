import pandas as pd

from leukflow.cli import main


def test_demo_data_command_draws_a_dataset(tmp_path):
    assert main(["demo-data", str(tmp_path / "d"), "--n", "4", "--seed", "1",
                 "--fields-per-patient", "2"]) == 0  # fmt: skip
    labels = pd.read_csv(tmp_path / "d" / "labels.csv")
    assert len(labels) == 4
    assert labels["patient"].nunique() == 2


def test_demo_data_command_reports_bad_arguments(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "d"), "--n", "1"]) == 2
    assert "leukflow demo-data: error:" in capsys.readouterr().err


def test_metrics_command_prints_mean_std_and_pooled_ci(tmp_path, capsys):
    keys = {"dataset": "demo", "encoder": "resnet18", "classifier": "knn", "level": "roi"}
    rows = [
        {**keys, "fold": "0", "accuracy": 0.8, "sensitivity": 0.7, "specificity": 0.9},
        {**keys, "fold": "mean", "accuracy": 0.85, "sensitivity": 0.75, "specificity": 0.95},
        {**keys, "fold": "std", "accuracy": 0.05, "sensitivity": 0.05, "specificity": 0.05},
        {**keys, "fold": "pooled", "metric": "accuracy", "accuracy": 0.84,
         "ci_low": 0.71, "ci_high": 0.93},
    ]  # fmt: skip
    table = pd.DataFrame(rows).reindex(columns=[*rows[-1], "sensitivity", "specificity",
                                                "f1", "roc_auc"])  # fmt: skip
    table.to_csv(tmp_path / "metrics.csv", index=False)
    assert main(["metrics", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0.850 ± 0.050" in out
    assert "0.840 [0.710, 0.930]" in out


def test_metrics_command_on_a_missing_run(tmp_path, capsys):
    assert main(["metrics", str(tmp_path / "nowhere")]) == 2
    assert "nowhere/metrics.csv" in capsys.readouterr().err
