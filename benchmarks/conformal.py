"""Conformal prediction sets on real white cells: coverage, set size and review share.

Zheng et al. 2018 (../shared/data/segmentation_WBC, 400 single-cell crops, 5
classes): HOG features of each crop (the ``hog`` encoder's features, no
training), grouped 5-fold CV by leukflow's own fold assignment (exact pixel
copies in one group), the classifiers fitted and calibrated per fold exactly as
the workflow does (cross-conformal on each training fold,
:func:`leukflow.evaluate.scoring.evaluate_embeddings`), pooled over the folds.
Then the shift: fitted and calibrated on Dataset 1, sets measured on Dataset 2
(:func:`leukflow.evaluate.cross.evaluate_cross`). Prints one row per
classifier and level. CPU only.

    PYTHONPATH=src python benchmarks/conformal.py --alpha 0.1
"""

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from leukflow.data.datasets import list_zheng
from leukflow.evaluate.conformal import ConformalSettings
from leukflow.evaluate.cross import evaluate_cross
from leukflow.evaluate.folds import assign_folds, label_rois
from leukflow.evaluate.scoring import ScoringSettings, evaluate_embeddings
from leukflow.learn.hog import hog_features

ZHENG = Path(__file__).resolve().parents[2] / "shared" / "data" / "segmentation_WBC"
CLASSIFIERS = {
    "logistic_regression": {"C": 0.1, "max_iter": 2000, "pca_components": 64},
    "knn": {"n_neighbors": 10, "pca_components": 32},
    "random_forest": {"n_estimators": 200, "seed": 0},
}
SHOWN = ["coverage", "set_size", "review_share", "kept_accuracy", "augrc", "calibration_n"]


def load_zheng(size: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Return the manifest (exact pixel copies share a patient) and the HOG features."""
    manifest, _ = list_zheng(ZHENG)
    crops, digests = [], []
    for path in manifest["path"]:
        rgb = Image.open(ZHENG / path).convert("RGB")
        digests.append(hashlib.sha256(np.asarray(rgb).tobytes()).hexdigest())
        crops.append(np.asarray(rgb.resize((size, size), Image.BILINEAR)))
    first = {}
    patient = [first.setdefault(d, p) for d, p in zip(digests, manifest["path"], strict=True)]
    manifest = manifest.assign(image_id=manifest["path"], dataset="zheng", patient=patient,
                               site=manifest["path"].str.split("/").str[0])  # fmt: skip
    return manifest, hog_features(np.stack(crops), input_size_px=size)


def summary(result, what: str) -> pd.DataFrame:
    """Pooled conformal figures per classifier and level, with the multi-class accuracy."""
    metrics = result.metrics
    pooled = metrics[metrics["fold"] == "pooled"].drop_duplicates(["classifier", "level"])
    preds = result.roi_predictions
    accuracy = (preds["pred"] == preds["label"]).groupby(preds["classifier"]).mean()
    pooled = pooled.assign(accuracy=pooled["classifier"].map(accuracy))
    return pooled[["classifier", "level", "accuracy", *SHOWN]].assign(run=what)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="HOG input side")
    parser.add_argument("--mondrian", action="store_true")
    args = parser.parse_args()
    if not ZHENG.is_dir():
        sys.exit(f"Zheng data not found at {ZHENG}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    manifest, features = load_zheng(args.size)
    folds = assign_folds(manifest, k=args.k, seed=0).merge(manifest[["image_id", "site"]])
    folds = folds.assign(group=folds["patient"], leaky=False)
    rois = label_rois(manifest[["image_id"]].assign(roi_id=manifest["image_id"]), folds)
    rois = rois.merge(folds[["image_id", "group"]], on="image_id")
    settings = ScoringSettings("lymphocyte", n_boot=20, conformal=ConformalSettings(
        alpha=args.alpha, mondrian=args.mondrian))  # fmt: skip
    grouped = evaluate_embeddings({k: features for k in range(args.k)}, rois, folds,
                                  classifiers=CLASSIFIERS, settings=settings)  # fmt: skip
    d1 = (rois["image_id"].str.startswith("Dataset 1")).to_numpy()
    test_images = folds[folds["site"] == "Dataset 2"]
    shift = evaluate_cross(features[d1], rois[d1].drop(columns="fold"), features[~d1],
                           rois[~d1][["roi_id", "image_id", "label"]], test_images,
                           classifiers=CLASSIFIERS, settings=settings)  # fmt: skip
    table = pd.concat([summary(grouped, f"zheng grouped {args.k}-fold CV"),
                       summary(shift, "Dataset 1 -> Dataset 2")])  # fmt: skip
    table = table[table["level"] == "roi"]
    pd.set_option("display.width", 200)
    print(f"alpha {args.alpha} (target coverage {1 - args.alpha:.2f}), mondrian "
          f"{args.mondrian}, {len(rois)} cells, HOG {features.shape[1]} dims")  # fmt: skip
    print(table.round(3).to_string(index=False))
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
