"""Segmentation on real smear fields: BCCD's 364 fields against their WBC boxes."""

import json

import pandas as pd
import pytest

from leukflow.data.datasets import list_bccd
from leukflow.data.io import read_voc_boxes
from leukflow.segment import SegmentParams, match_rois_to_boxes, segment_images
from leukflow.segment.qa import score_segmentation, summarise_qa


@pytest.fixture(scope="module")
def bccd(shared_data):
    root = shared_data / "BCCD_Dataset" / "BCCD"
    images = sorted((root / "JPEGImages").glob("*.jpg"))
    boxes = {p.stem: read_voc_boxes(root / "Annotations" / f"{p.stem}.xml") for p in images}
    return images, boxes


def hit_rate(images, boxes, params: SegmentParams) -> tuple[float, float, int]:
    rois = segment_images(images, [p.stem for p in images], params=params, n_workers=2).rois
    hits = false = n_boxes = 0
    for stem, wbc in boxes.items():
        h, f = match_rois_to_boxes(rois[rois["image_id"] == stem], wbc)
        hits, false, n_boxes = hits + h, false + f, n_boxes + len(wbc)
    return hits / n_boxes, false / len(images), n_boxes


@pytest.mark.realdata
def test_bccd_layout_as_documented(bccd):
    images, boxes = bccd
    assert len(images) == 364
    counts = pd.Series({stem: len(b) for stem, b in boxes.items()}).value_counts()
    assert counts.to_dict() == {1: 344, 2: 14, 0: 6}


@pytest.mark.realdata
def test_bccd_white_cells_found_and_stain_channel_beats_grey(bccd):
    # S0 as published thresholds the grey image; on BCCD's stain red cells are
    # nearly as dark as nuclei there, so the red-minus-blue channel (purple
    # nuclei against red cells) is what config.schema.yaml recommends for it.
    images, boxes = bccd
    stain = hit_rate(images, boxes, SegmentParams(channel="red_minus_blue", min_area_px=1000))
    grey = hit_rate(images, boxes, SegmentParams(channel="grey", min_area_px=1000))
    assert stain[2] == grey[2] == 372
    assert stain[0] >= 0.97
    assert grey[0] >= 0.95
    assert stain[1] <= 0.2
    assert stain[1] < grey[1] / 5


@pytest.mark.realdata
def test_bccd_qa_multiotsu_published_and_tuned(shared_data):
    # The QA path (manifest annotations -> recall, false ROIs per field) on a
    # quarter of BCCD. Targets for multiotsu: recall >= 0.95 with <= 0.5 false
    # ROIs per field. S0 as published (grey, min_area_px 250) keeps the recall
    # but not the false ROIs (all 364: 0.997, 6.4); the tuned variant
    # (red_minus_blue, min_area_px 1000) reaches both (all 364: 0.997, 0.08).
    root = shared_data / "BCCD_Dataset" / "BCCD"
    records, _ = list_bccd(root)
    images = records.iloc[::4].assign(
        root=str(root), image_id="bccd/" + records["path"].str.removesuffix(".jpg")
    )
    assert len(images) == 91
    tuned = SegmentParams(channel="red_minus_blue", min_area_px=1000)
    per_image = score_segmentation(images, tuned, n_workers=2)
    summary = summarise_qa(per_image, ["multiotsu"]).iloc[0]
    assert summary["truth"] == "boxes"
    assert summary["n_images"] == 91
    assert summary["n_cells"] == sum(len(json.loads(a)["boxes"]) for a in images["annotations"])
    assert summary["recall"] >= 0.95
    assert summary["false_rois_per_image"] <= 0.5
    published = summarise_qa(score_segmentation(images, SegmentParams(), n_workers=2), []).iloc[0]
    assert published["recall"] >= 0.95
    assert published["false_rois_per_image"] > 2
