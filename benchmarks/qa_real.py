"""Segmentation quality of every method on the real sets in ../shared/data and the demo.

Prints one table: Zheng's Dataset 1 (300 crops) and Dataset 2 (100 crops)
against their expert masks (mean Dice of the whole cell and of the nucleus,
crops with exactly one ROI), and BCCD's 364 fields against their WBC boxes
(recall, false ROIs per field), for each segmentation method as published and
the tuned variants the config documents, each with and without
``split_touching``. Then the demo's 60 fields (seed 0, as config/config.yaml
draws them) against every planted white cell in cells.csv: recall, false
ROIs, and merged pairs (two planted cells whose centres fall in one region).
Before each table it lists the images whose figures (ROIs, Dice, boxes hit,
false ROIs) differ between a method and the same + split.

    .venv/bin/python benchmarks/qa_real.py [--workers 2] [--only demo|zheng|bccd]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from leukflow.data.datasets import encode_annotations, list_bccd, list_demo, list_zheng
from leukflow.data.demo import draw_demo_dataset
from leukflow.data.io import read_image
from leukflow.segment import SegmentParams, segment_field
from leukflow.segment.qa import score_segmentation, summarise_qa

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

ZHENG = {
    "multiotsu (S0)": SegmentParams(),
    "multiotsu (S0), central": SegmentParams(keep_regions="central"),
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
DEMO = {
    "multiotsu (S0, the default)": SegmentParams(),
    "multiotsu red_minus_blue, min area 1000": SegmentParams(
        channel="red_minus_blue", min_area_px=1000
    ),
}


def with_split(methods: dict) -> dict:
    """Each method as it is and with split_touching where it applies (SegmentParams.splits)."""
    out = {}
    for label, params in methods.items():
        out[label] = params
        split = replace(params, split_touching=True)
        if split.splits:
            out[f"{label} + split"] = split
    return out


def manifest(records: pd.DataFrame, root: Path, name: str, suffix: str) -> pd.DataFrame:
    return records.assign(
        root=str(root), image_id=f"{name}/" + records["path"].str.removesuffix(suffix)
    )


CHANGE_COLUMNS = ["n_rois", "dice_cell", "dice_nucleus", "hits", "false_rois"]


def score(images: pd.DataFrame, methods: dict, workers: int) -> pd.DataFrame:
    rows, per_method = [], {}
    for label, params in methods.items():
        per_image = score_segmentation(images, params, n_workers=workers)
        per_method[label] = per_image
        summary = summarise_qa(per_image, [params.method]).iloc[0]
        one = int((per_image["n_rois"] == 1).sum())
        rows.append({**summary.to_dict(), "method": label, "one_roi": one})
    print_changes(per_method)
    return pd.DataFrame(rows)


def print_changes(per_method: dict[str, pd.DataFrame]) -> None:
    """List the images whose figures differ between a method and the same + split."""
    for label, split in per_method.items():
        base = per_method.get(label.removesuffix(" + split"))
        if not label.endswith(" + split") or base is None:
            continue
        cols = [c for c in CHANGE_COLUMNS if c in base and base[c].notna().any()]
        a = base.set_index("image_id")[cols]
        b = split.set_index("image_id")[cols].reindex(a.index)
        differ = ~np.isclose(a.to_numpy(float), b.to_numpy(float), equal_nan=True).all(axis=1)
        print(f"\n{label}: {int(differ.sum())} images change")
        if differ.any():
            both = a[differ].merge(
                b[differ], left_index=True, right_index=True, suffixes=("", " split")
            )
            print(both.round(4).to_string())


def merged_pairs(images: pd.DataFrame, cells: pd.DataFrame, params: SegmentParams) -> int:
    """Pairs of planted cells whose box centres lie in one segmented region."""
    merged = 0
    for row in images.itertuples():
        seg = segment_field(read_image(Path(row.root) / row.path), params)
        mine = cells[cells["image"] == row.path]
        cx = ((mine["x0"] + mine["x1"]) // 2).to_numpy()
        cy = ((mine["y0"] + mine["y1"]) // 2).to_numpy()
        hit = seg.labels[cy, cx]
        hit = hit[hit > 0]
        merged += int(len(hit) - len(np.unique(hit)))
    return merged


def demo(workers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        draw_demo_dataset(root, n_fields=60, seed=0, fields_per_patient=3)
        records, _ = list_demo(root)
        cells = pd.read_csv(root / "cells.csv")
        boxes = cells.groupby("image")[["x0", "y0", "x1", "y1"]].apply(
            lambda b: encode_annotations(boxes=b.to_numpy().tolist())
        )
        records["annotations"] = records["path"].map(boxes)
        images = manifest(records, root, "demo", ".png")
        methods = with_split(DEMO)
        table = score(images, methods, workers)
        table["merged_pairs"] = [merged_pairs(images, cells, p) for p in methods.values()]
    print(f"\nDemo ({len(records)} fields, {len(cells)} planted white cells): recall, false ROIs, "
          "merged pairs")  # fmt: skip
    print(table[["method", "recall", "false_rois", "merged_pairs", "n_cells"]]
          .round(3).to_string(index=False))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=["demo", "zheng", "bccd"], default=None)
    args = parser.parse_args()
    pd.set_option("display.width", 200)
    if args.only in (None, "demo"):
        demo(args.workers)
    if args.only == "demo":
        return
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark needs ../shared/data")
    for part in ("Dataset 1", "Dataset 2"):
        if args.only not in (None, "zheng"):
            break
        root = DATA / "segmentation_WBC" / part
        records, _ = list_zheng(root)
        images = manifest(records, root, f"zheng/{part}", ".bmp")
        table = score(images, with_split(ZHENG), args.workers)
        print(f"\nZheng {part} ({len(records)} crops, expert masks): mean Dice, crops with "
              "exactly one ROI")  # fmt: skip
        print(table[["method", "dice_cell", "dice_nucleus", "n_without_rois", "one_roi"]]
              .round(3).to_string(index=False))  # fmt: skip
    if args.only not in (None, "bccd"):
        return
    root = DATA / "BCCD_Dataset" / "BCCD"
    records, _ = list_bccd(root)
    table = score(manifest(records, root, "bccd", ".jpg"), with_split(BCCD), args.workers)
    print(f"\nBCCD ({len(records)} fields, WBC boxes): targets recall >= 0.95, "
          "false ROIs per field <= 0.5")  # fmt: skip
    print(table[["method", "recall", "false_rois_per_image", "n_cells"]]
          .round(3).to_string(index=False))  # fmt: skip


if __name__ == "__main__":
    main()
