"""snakemake --report on a finished run, opened in a real headless browser."""

import html
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from browser import assert_not_blank, dump_dom, screenshot

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["1. Ingest", "2. Segmentation", "3. Training", "4. Metrics", "5. Plots"]
#: The figures a reader looks for: QA overlays, training curves, metric tables, plots.
ENTRIES = [
    "out/rejects.csv", "out/duplicates.csv", "out/provenance.json",
    "out/segment/demo/kmeans_scores.csv", "out/qa/demo/summary.csv",
    "out/qa/demo/per_image.csv", "out/qa/demo/overlays_multiotsu.png",
    *(f"out/train/demo/resnet18/fold_{k}_history.csv" for k in range(3)),
    "out/metrics.csv", "out/metrics_per_class.csv",
    *(f"out/plots/demo/resnet18/{clf}_{kind}.png" for clf in ("knn", "random_forest")
      for kind in ("confusion", "roc", "calibration", "wbc_count")),
]  # fmt: skip
#: matplotlib's default blue, the colour of the ROC curves.
MPL_BLUE = (31, 119, 180)


@pytest.fixture(scope="module")
def report(e2e_run, tmp_path_factory):
    work, _ = e2e_run
    path = tmp_path_factory.mktemp("report") / "report.html"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--cores", "1", "--configfile", "my.yaml", "--report", str(path)]  # fmt: skip
    run = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return path


@pytest.mark.e2e
def test_report_holds_every_stage_and_its_tables(report):
    text = report.read_text()
    for entry in ENTRIES:
        assert f'"{entry}"' in text, f"{entry} is not in the report"
    for category in CATEGORIES:
        assert f'"{category}"' in text
    assert "System Message" not in text  # every caption rendered, tables included
    captions = html.unescape(text)
    assert "images/field_999.png" in captions  # the rejects table, in its caption
    assert "segmentation.method" in captions  # the workflow description


@pytest.mark.e2e
def test_report_renders_in_chromium_with_its_figures(report, tmp_path):
    dom = dump_dom(report.as_uri())
    for category in CATEGORIES:  # the menu is built by the report's scripts
        assert category in dom
    pixels = screenshot(report.as_uri(), tmp_path / "report.png")
    assert_not_blank(pixels)
    # open the ROC plot the way a click on it does, and see it drawn
    roc = tmp_path / "roc.html"
    path = "out/plots/demo/resnet18/knn_roc.png"
    roc.write_text(
        report.read_text()
        + '<script>window.addEventListener("load", () => setTimeout(() => app.setView('
        + f'{{content: "img", contentPath: results["{path}"].data_uri, resultPath: "{path}"}}'
        + "), 200));</script>"
    )
    figure = screenshot(roc.as_uri(), tmp_path / "roc.png")
    assert_not_blank(figure)
    assert (np.abs(figure.astype(int) - MPL_BLUE).sum(-1) < 30).sum() > 500
