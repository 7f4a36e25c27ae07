"""Segmentation defaults, read from their one home: the config schema's ``segmentation``.

:class:`~leukflow.segment.rois.SegmentParams` and the method functions of
:mod:`~leukflow.segment.methods` take their defaults from these tables, so
the library called directly segments as a run whose config leaves the keys
out.
"""

from __future__ import annotations

from typing import Any

from leukflow.core.config import load_schema


def _defaults(properties: dict[str, Any]) -> dict[str, Any]:
    return {key: spec["default"] for key, spec in properties.items() if "default" in spec}


_SEGMENTATION = load_schema()["properties"]["segmentation"]["properties"]
#: ``segmentation`` key -> default (``multiotsu``'s own keys sit at this level).
SEGMENTATION: dict[str, Any] = _defaults(_SEGMENTATION)
#: ``segmentation.kmeans`` key -> default.
KMEANS: dict[str, Any] = _defaults(_SEGMENTATION["kmeans"]["properties"])
#: ``segmentation.otsu_contours`` key -> default.
OTSU_CONTOURS: dict[str, Any] = _defaults(_SEGMENTATION["otsu_contours"]["properties"])
#: ``segmentation.center_crop`` key -> default.
CENTER_CROP: dict[str, Any] = _defaults(_SEGMENTATION["center_crop"]["properties"])
