"""Segmentation quality of every method on the real sets in ../shared/data.

Prints one table: Zheng's Dataset 1 (300 crops) and Dataset 2 (100 crops)
against their expert masks (mean Dice of the whole cell and of the nucleus),
and BCCD's 364 fields against their WBC boxes (recall, false ROIs per field),
for each segmentation method as published and the tuned variants the config
documents.

    .venv/bin/python benchmarks/qa_real.py [--workers 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from leukflow.data.datasets import list_bccd, list_zheng
from leukflow.segment import SegmentParams
from leukflow.segment.qa import score_segmentation, summarise_qa

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

ZHENG = {
    "multiotsu (S0)": SegmentParams(),
    "kmeans k=3 (S2, no masks)": SegmentParams(method="kmeans",
                                               kmeans={"select_by_masks": False}),
    "kmeans k by masks, central (S2, oracle)": SegmentParams(method="kmeans",
                                                             keep_regions="central"),
    "otsu_contours (S4)": SegmentParams(method="otsu_contours"),
    "center_crop (S4)": SegmentParams(method="center_crop"),
    "none": SegmentParams(method="none"),
}  # fmt: skip
BCCD = {
    "multiotsu grey, min area 250 (S0 as published)": SegmentParams(),
    "multiotsu red_minus_blue, min area 1000 (tuned)": SegmentParams(
        channel="red_minus_blue", min_area_px=1000
    ),
    "kmeans k=3 (S2, no masks)": SegmentParams(method="kmeans",
                                               kmeans={"select_by_masks": False}),
    "otsu_contours (S4)": SegmentParams(method="otsu_contours"),
}  # fmt: skip


def manifest(records: pd.DataFrame, root: Path, name: str, suffix: str) -> pd.DataFrame:
    return records.assign(
        root=str(root), image_id=f"{name}/" + records["path"].str.removesuffix(suffix)
    )


def score(images: pd.DataFrame, methods: dict, workers: int) -> pd.DataFrame:
    rows = []
    for label, params in methods.items():
        per_image = score_segmentation(images, params, n_workers=workers)
        summary = summarise_qa(per_image, [params.method]).iloc[0]
        rows.append({**summary.to_dict(), "method": label})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark needs ../shared/data")
    pd.set_option("display.width", 200)
    for part in ("Dataset 1", "Dataset 2"):
        root = DATA / "segmentation_WBC" / part
        records, _ = list_zheng(root)
        table = score(manifest(records, root, f"zheng/{part}", ".bmp"), ZHENG, args.workers)
        print(f"\nZheng {part} ({len(records)} crops, expert masks): mean Dice")
        print(table[["method", "dice_cell", "dice_nucleus", "n_without_rois"]]
              .round(3).to_string(index=False))  # fmt: skip
    root = DATA / "BCCD_Dataset" / "BCCD"
    records, _ = list_bccd(root)
    table = score(manifest(records, root, "bccd", ".jpg"), BCCD, args.workers)
    print(f"\nBCCD ({len(records)} fields, WBC boxes): targets recall >= 0.95, "
          "false ROIs per field <= 0.5")  # fmt: skip
    print(table[["method", "recall", "false_rois_per_image", "n_cells"]]
          .round(3).to_string(index=False))  # fmt: skip


if __name__ == "__main__":
    main()
