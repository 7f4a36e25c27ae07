"""Predict: apply a finished run's segmentation, encoders and classifiers to new images.

A results folder holds everything needed: ``provenance.json`` (the resolved
config the run used), and for each of the run's folds (``0..k-1``, or fold 0
of a holdout split) an encoder checkpoint (``train/<dataset>/<encoder>/fold_<k>.pt``,
or the one ``all.pt`` of an ``all_labels`` or ``frozen`` encoder) and a fitted
classifier (``evaluate/<dataset>/<encoder>/models/<classifier>_fold_<k>.skops``,
read with :func:`leukflow.evaluate.model_files.load_model`, which refuses
non-scikit-learn types); ``cnn_softmax`` is the checkpoint's own head.
:class:`leukflow.plan.RunPlan` names these files; :func:`load_predictor`
checks that they agree with each other and with the config before anything
is predicted.

A new image has no test fold, so every fold's model gives its opinion: each
ROI goes through each fold's encoder and that fold's classifier, and the
ROI's class probabilities are the **mean of the folds' probabilities** (a
fold whose classifier never saw a label gives it probability 0). The ROI's
call is the label of highest mean probability. An ensemble
(``encoder="ensemble"``, ``classifier=<name>``) votes as the run did: each
member's fold mean, then the soft vote (mean probability) or the majority
vote (the class most members call, score = share of members calling
``positive_label``). Image-level calls aggregate
the ROIs exactly as the run did (``evaluation.image_aggregation``, see
:func:`leukflow.evaluate.images.aggregate_images`); an image without ROIs is called
negative.

Images are processed in chunks of ``segmentation.chunk_size`` images and at
most :data:`MAX_CHUNK_PIXELS` pixels, so memory grows neither with the number
of images nor with their size; an unreadable image, or one in which no white
cell is found, gets a row with the reason and the run goes on. Names that a
user gave (file names, messages naming them) never start a CSV cell with
``= + - @`` (see :func:`spreadsheet_safe`).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont
from sklearn.pipeline import Pipeline
from tqdm.auto import tqdm

from leukflow.core.config import ConfigError, validate_config
from leukflow.core.provenance import read_provenance
from leukflow.data.io import (
    InvalidInputError,
    atomic_path,
    is_image_candidate,
    read_image,
    sha256_file,
)
from leukflow.evaluate.classifiers import PROBA_PREFIX
from leukflow.evaluate.conformal import prediction_sets, set_text
from leukflow.evaluate.images import NO_ROI, aggregate_images
from leukflow.evaluate.model_files import load_model
from leukflow.plan import CNN_SOFTMAX, ENSEMBLE, RunPlan
from leukflow.segment import SegmentParams, field_rois, segment_field

log = logging.getLogger(__name__)

#: Decoded pixels a chunk holds at most (about 150 MB of RGB); a chunk ends at
#: ``chunk_size`` images or at this many pixels, whichever comes first.
MAX_CHUNK_PIXELS = 50_000_000
#: First characters that make a spreadsheet read a cell as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: Columns of the per-ROI table, before the ``proba_<class>`` columns and after them.
ROI_PREFIX_COLUMNS = [
    "image",
    "roi",
    "x0",
    "y0",
    "x1",
    "y1",
    "area_px",
    "centroid_x",
    "centroid_y",
]
ROI_SUFFIX_COLUMNS = ["label", "score", "prediction_set", "review"]
#: Columns of the review queue (``<out stem>_review.csv``), most uncertain cell first.
REVIEW_COLUMNS = [*ROI_PREFIX_COLUMNS[:6], "prediction_set", "label", "confidence"]
#: Columns of the per-image table.
IMAGE_TABLE_COLUMNS = [
    "image", "status", "reason", "message", "width", "height", "n_rois",
    "label", "score", "pred_class", "review", "overlay",
]  # fmt: skip


class ModelMismatchError(ValueError):
    """The files of a results folder disagree with each other or with its config."""


@dataclass
class FoldModel:
    """One fold's encoder and classifier.

    Attributes
    ----------
    fold : int
        The fold whose training part fitted both.
    embed : callable
        ``(n, S, S, 3)`` uint8 crops -> ``(n, dim)`` float32 embeddings.
    classifier : sklearn.pipeline.Pipeline or None
        Fitted on that fold's embeddings; None: the encoder's own softmax
        head (``cnn_softmax``).
    checkpoint : dict
        The encoder checkpoint's metadata (``arch``, ``classes``,
        ``input_size_px``, ``mean``, ``std``; no weights).
    member : str
        The model, ``<encoder>/<classifier>`` (an ensemble's member).
    head : callable, optional
        ``(n, S, S, 3)`` uint8 crops -> ``(n, n_classes)`` softmax of the head
        (columns in ``checkpoint["classes"]`` order); needed without a classifier.
    """

    fold: int
    embed: Callable[[np.ndarray], np.ndarray]
    classifier: Pipeline | None
    checkpoint: dict[str, Any]
    member: str = ""
    head: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def classes(self) -> list[str]:
        """The classes of :meth:`predict_proba`'s columns."""
        if self.classifier is None:
            return [str(c) for c in self.checkpoint["classes"]]
        return [str(c) for c in self.classifier.classes_]

    def predict_proba(self, crops: np.ndarray) -> np.ndarray:
        """``(n, len(classes))`` probabilities of ``(n, S, S, 3)`` uint8 crops."""
        if self.classifier is None:
            if self.head is None:
                raise ValueError(
                    f"FoldModel {self.member} fold {self.fold}: no classifier, no head"
                )
            return self.head(crops)
        return self.classifier.predict_proba(self.embed(crops))


@dataclass
class Predictor:
    """A trained pipeline, ready for new images (see :func:`load_predictor`).

    Attributes
    ----------
    results_dir : Path
        Where it was loaded from.
    dataset, encoder, classifier : str
        Which of the run's models it applies (an ensemble: encoder
        ``ensemble``, classifier its name).
    params : SegmentParams
        The run's segmentation.
    folds : list of FoldModel
        One per fold (per member and fold for an ensemble); each member's
        folds' probabilities are averaged.
    classes : list of str
        Every label the run trained on, sorted (the ``proba_<class>`` columns).
    positive_label, image_aggregation : str
        From the run's config.
    any_positive_threshold : float
        From the run's config.
    device : torch.device
        Where the encoders run.
    chunk_size : int
        Images per encoder batch (the run's ``segmentation.chunk_size``).
    notes : list of str
        Choices made for the user (e.g. which of several classifiers).
    vote : str
        ``""`` for one model; an ensemble's ``soft`` or ``majority``.
    conformal : dict or None
        The run's conformal.json for this model (thresholds per fold, the
        image rule); None when the run has none (conformal prediction off):
        ``prediction_set`` and ``review`` are then empty.
    """

    results_dir: Path
    dataset: str
    encoder: str
    classifier: str
    params: SegmentParams
    folds: list[FoldModel]
    classes: list[str]
    positive_label: str
    image_aggregation: str
    any_positive_threshold: float
    device: torch.device
    chunk_size: int = 8
    notes: list[str] = field(default_factory=list)
    vote: str = ""
    conformal: dict | None = None

    @property
    def members(self) -> list[str]:
        """The models whose calls are combined, in order (one unless an ensemble)."""
        return list(dict.fromkeys(f.member for f in self.folds))

    @property
    def proba_columns(self) -> list[str]:
        """``proba_<class>`` column names, in :attr:`classes` order."""
        return [PROBA_PREFIX + c for c in self.classes]

    @property
    def negative_label(self) -> str:
        """The image call when not positive: the one other class, else ``not_<positive>``."""
        others = [c for c in self.classes if c != self.positive_label]
        return others[0] if len(others) == 1 else "not_" + self.positive_label


# ------------------------------------------------------------------ loading


def _fold_encoder(
    path: Path, device: torch.device
) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any], int, Callable | None]:
    """Load one fold's encoder: the only place that knows models.py and embed.py.

    Returns
    -------
    embed : callable
        ``(n, S, S, 3)`` uint8 -> ``(n, dim)`` float32 (penultimate layer).
    checkpoint : dict
        The checkpoint without its weights.
    dim : int
        The embedding dimension.
    head : callable or None
        ``(n, S, S, 3)`` uint8 -> ``(n, n_classes)`` softmax of the trained
        head; None when the checkpoint has none (frozen, HOG).
    """
    from leukflow.learn.embed import embed_crops
    from leukflow.learn.models import encoder_from_checkpoint, load_checkpoint

    checkpoint = load_checkpoint(path)
    meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    model = None if meta["arch"] == "hog" else encoder_from_checkpoint(checkpoint).to(device)
    dim = int(meta["dim"]) if model is None else int(model.dim)

    def run(crops: np.ndarray, with_probs: bool) -> tuple[np.ndarray, np.ndarray | None]:
        return embed_crops(
            model, crops, input_size_px=meta["input_size_px"], dim=dim,
            mean=meta["mean"], std=meta["std"], device=device, with_probs=with_probs,
            stain=meta.get("stain"),  # absent from checkpoints before stain normalisation
        )  # fmt: skip

    def embed(crops: np.ndarray) -> np.ndarray:
        return run(crops, False)[0]

    def head(crops: np.ndarray) -> np.ndarray:
        return run(crops, True)[1]

    return embed, meta, dim, head if meta.get("has_head") and model is not None else None


def _choose(kind: str, wanted: str | None, available: Sequence[str], where: str) -> str:
    """Pick ``wanted`` among ``available`` (default: the first, noted when there are several)."""
    if not available:
        raise ModelMismatchError(f"load_predictor: no {kind} in {where}")
    if wanted is None:
        return available[0]
    if wanted not in available:
        raise ValueError(
            f"load_predictor: {kind} {wanted!r} is not in the run; expected one of "
            f"{list(available)} (from {where})"
        )
    return wanted


def load_predictor(
    results_dir: str | Path,
    *,
    dataset: str | None = None,
    encoder: str | None = None,
    classifier: str | None = None,
    folds: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> Predictor:
    """Load a finished run's models for one dataset, encoder and classifier.

    Any model the run scored can be loaded: a fitted classifier on any encoder
    (per fold, ``all_labels``, ``frozen``, HOG), an encoder's ``cnn_softmax``
    head, or an ensemble (``encoder="ensemble"``, ``classifier`` its name);
    of a k-fold run or a holdout split (fold 0 only), of a configured dataset
    or its twin. :class:`leukflow.plan.RunPlan` names the files.

    Parameters
    ----------
    results_dir : str or Path
        The run's ``results_dir`` (holding ``provenance.json``).
    dataset, encoder, classifier : str, optional
        Which models to apply; each defaults to the first in the run's config
        (with a note in :attr:`Predictor.notes` when the run has several); the
        classifier to the first that scores the encoder.
    folds : sequence of int, optional
        Use only these folds' models (default: all of the run's folds).
    device : torch.device or str, optional
        Where the encoders run; CUDA when present, else CPU.

    Returns
    -------
    Predictor

    Raises
    ------
    FileNotFoundError
        No ``provenance.json``, or a fold's checkpoint or classifier is missing.
    ModelMismatchError
        A checkpoint's architecture, input size or classes, or a classifier's
        features or classes, do not match the config or each other.
    """
    results_dir = Path(results_dir)
    where = f"{results_dir}/provenance.json"
    config = _run_config(read_provenance(results_dir)["config"], where)
    plan = RunPlan.from_config(config, results_dir=str(results_dir))
    notes: list[str] = []

    def choose(kind: str, wanted: str | None, available: list[str]) -> str:
        chosen = _choose(kind, wanted, available, where)
        if wanted is None and len(available) > 1:
            notes.append(
                f"{kind} {chosen!r} chosen, the first of {available}; pick another with --{kind}"
            )
        return chosen

    dataset = choose("dataset", dataset, [*plan.configured, *plan.twins])
    encoder = choose("encoder", encoder, [*plan.encoders, *([ENSEMBLE] if plan.ensembles else [])])
    heads = list(plan.ensembles) if encoder == ENSEMBLE else plan.classifiers_for(encoder)
    classifier = choose("classifier", classifier, heads)
    folds = list(plan.folds) if folds is None else [int(f) for f in folds]
    if not folds or not set(folds) <= set(plan.folds):
        raise ValueError(
            f"load_predictor: folds must be a non-empty subset of the run's folds "
            f"{list(plan.folds)}; got {folds}"
        )
    device = torch.device(device) if device is not None else _default_device()
    params = SegmentParams.from_mapping(config["segmentation"])
    encoders: dict[str, tuple] = {}  # one load per checkpoint file
    fold_models = []
    for files in plan.model_files(dataset, encoder, classifier):
        if files.fold not in folds:
            continue
        ckpt_path = Path(files.checkpoint)
        clf_path = None if files.classifier is None else Path(files.classifier)
        for path in (ckpt_path, clf_path):
            if path is not None and not path.is_file():
                raise FileNotFoundError(
                    f"load_predictor: {path} is missing; the run in {results_dir} "
                    f"is unfinished or was made with another config"
                )
        member_encoder = files.member.split("/")[0]
        first_use = files.checkpoint not in encoders
        if first_use:
            encoders[files.checkpoint] = _fold_encoder(ckpt_path, device)
        embed, meta, dim, head = encoders[files.checkpoint]
        clf = None if clf_path is None else load_model(clf_path)
        arch = config["encoders"][member_encoder]["arch"]
        _check_fold(meta, dim, clf, fold=files.fold, arch=arch, params=params, ckpt=ckpt_path,
                    clf_path=clf_path)  # fmt: skip
        if clf is None and head is None:
            raise ModelMismatchError(
                f"load_predictor: {ckpt_path} has no trained head (cnn_softmax)"
            )
        expected = _embedding_attrs(Path(files.store)).get(files.part, {}).get("weights_sha256")
        if first_use and expected is not None and expected != sha256_file(ckpt_path):
            raise ModelMismatchError(
                f"load_predictor: {ckpt_path} is not the checkpoint that made the run's "
                f"embeddings (sha256 differs from embeddings/{dataset}/{member_encoder}.zarr)"
            )
        fold_models.append(FoldModel(files.fold, embed, clf, meta, files.member, head))
    classes = sorted(set().union(*(f.classes for f in fold_models)))
    positive = config["positive_label"]
    if positive not in classes:
        notes.append(f"positive_label {positive!r} is not among the classes {classes}")
    log.info(
        "loaded %s / %s / %s: %d fold models on %s, classes %s", dataset, encoder, classifier,
        len(fold_models), device, classes,
    )  # fmt: skip
    return Predictor(
        results_dir=results_dir,
        dataset=dataset,
        encoder=encoder,
        classifier=classifier,
        params=params,
        folds=fold_models,
        classes=classes,
        positive_label=positive,
        image_aggregation=config["evaluation"]["image_aggregation"],
        any_positive_threshold=float(config["evaluation"]["any_positive_threshold"]),
        device=device,
        chunk_size=int(config["segmentation"]["chunk_size"]),
        notes=notes,
        vote=plan.ensembles[classifier]["vote"] if encoder == ENSEMBLE else "",
        conformal=_conformal_file(
            plan, dataset, encoder, classifier, notes, folds={f.fold for f in fold_models}
        ),
    )


def _conformal_file(
    plan: RunPlan,
    dataset: str,
    encoder: str,
    classifier: str,
    notes: list[str],
    *,
    folds: set[int],
) -> dict | None:
    """Read the model's conformal.json (plain JSON); None, with a note, when absent or off.

    The file comes from a results folder, which may not be this user's: it is
    checked to hold, for every fold, numbers where thresholds belong, and is
    refused naming the file otherwise (:class:`ModelMismatchError`).
    """
    if encoder == ENSEMBLE:
        path = Path(plan.ensemble_file("conformal.json", dataset, classifier))
    elif classifier == CNN_SOFTMAX:
        path = Path(plan.head_file("conformal.json", dataset, encoder))
    else:
        path = Path(plan.fitted_file("conformal.json", dataset, encoder))
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
        models = (saved.get("models") or {}).get(classifier)
        if not saved.get("enabled") or not models:
            notes.append(f"no conformal thresholds in {path}: prediction_set and review are empty")
            return None
        _check_conformal(saved, models, folds)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise ModelMismatchError(f"load_predictor: {path} is not a conformal.json leukflow "
                                 f"wrote: {err}") from None  # fmt: skip
    return {**saved, "models": models}


def _check_conformal(saved: dict, models: dict, folds: set[int]) -> None:
    """Raise ValueError unless ``models`` holds numeric ROI thresholds for every fold."""
    if saved.get("image_rule") not in ("any", "share"):
        raise ValueError(f"image_rule {saved.get('image_rule')!s:.40} is not 'any' or 'share'")
    float(saved["image_review_share"])
    for fold in sorted(folds):
        roi = models[str(fold)]["roi"]
        limits = [roi["threshold"], *dict(roi.get("class_thresholds", {})).values()]
        if not all(t is None or isinstance(t, int | float) for t in limits):
            raise ValueError(f"fold {fold}: a threshold is not a number")


def _run_config(config: dict, where: str) -> dict:
    """Return the run's config with every default filled in, as the workflow saw it."""
    try:
        return validate_config(copy.deepcopy(config), check_paths=False)
    except ConfigError as err:
        raise ModelMismatchError(
            f"load_predictor: the config in {where} is not one this leukflow reads: {err}"
        ) from err


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _embedding_attrs(path: Path) -> dict[str, dict]:
    """Per-array attributes of the run's embedding store ({} when it is absent)."""
    if not path.is_dir():
        return {}
    from leukflow.data.io import open_embeddings

    return {name: dict(arr.attrs) for name, arr in open_embeddings(path).items()}


def _check_fold(
    meta: dict, dim: int, clf: Pipeline | None, *, fold: int, arch: str, params: SegmentParams,
    ckpt: Path, clf_path: Path | None,
) -> None:  # fmt: skip
    """Refuse a fold whose files disagree with the config or with each other."""
    problems = []
    if meta["arch"] != arch:
        problems.append(f"{ckpt.name} is a {meta['arch']!r} encoder; the config says {arch!r}")
    if int(meta["input_size_px"]) != params.roi_size_px:
        problems.append(
            f"{ckpt.name} was trained on {meta['input_size_px']} px crops; the config's "
            f"segmentation.roi_size_px is {params.roi_size_px}"
        )
    n_features = getattr(clf, "n_features_in_", None)
    if clf_path is not None and n_features is not None and int(n_features) != dim:
        problems.append(f"{clf_path.name} expects {n_features} features; the encoder gives {dim}")
    extra = (
        [] if clf is None else sorted(set(map(str, clf.classes_)) - set(map(str, meta["classes"])))
    )
    if clf_path is not None and extra:
        problems.append(
            f"{clf_path.name} predicts classes {extra} that {ckpt.name} never saw "
            f"(encoder classes {meta['classes']})"
        )
    if problems:
        raise ModelMismatchError(
            f"load_predictor: fold {fold} does not match the run's config: " + "; ".join(problems)
        )


# --------------------------------------------------------------- predicting


def _fold_probabilities(
    predictor: Predictor, crops: np.ndarray
) -> dict[tuple[str, int], np.ndarray]:
    """Each (member, fold) model's class probabilities, in predictor.classes order."""
    out = {}
    for fold in predictor.folds:
        full = np.zeros((len(crops), len(predictor.classes)))
        proba = fold.predict_proba(crops)
        for j, c in enumerate(fold.classes):
            full[:, predictor.classes.index(c)] = proba[:, j]
        out[(fold.member, fold.fold)] = full
    return out


def _member_probabilities(
    predictor: Predictor, crops: np.ndarray, per_fold: dict | None = None
) -> dict[str, np.ndarray]:
    """Each member's mean class probabilities over its folds, in predictor.classes order."""
    per_fold = _fold_probabilities(predictor, crops) if per_fold is None else per_fold
    members: dict[str, list[np.ndarray]] = {}
    for (member, _fold), proba in per_fold.items():
        members.setdefault(member, []).append(proba)
    return {member: np.mean(probas, axis=0) for member, probas in members.items()}


def deployed_sets(
    predictor: Predictor, per_fold: dict[tuple[str, int], np.ndarray]
) -> tuple[list[str], np.ndarray]:
    """Give each crop its deployed prediction set: the labels most folds' sets keep.

    Fold ``k``'s set comes from fold ``k``'s probabilities (an ensemble: the
    mean over its members' fold-``k`` models, as the run calibrated the vote)
    and fold ``k``'s own ROI-level thresholds in conformal.json; a label is in
    the deployed set when more than half of the folds keep it. ``review``:
    the set is not exactly one label.

    Returns
    -------
    sets : list of str
        Labels joined by ``|`` (empty: no label); all empty without thresholds.
    review : numpy.ndarray
        ``(n,)`` object: True / False, or ``""`` without thresholds.
    """
    n = len(next(iter(per_fold.values()))) if per_fold else 0
    if predictor.conformal is None:
        return [""] * n, np.full(n, "", dtype=object)
    folds: dict[int, list[np.ndarray]] = {}
    for (_member, fold), proba in per_fold.items():
        folds.setdefault(fold, []).append(proba)
    kept = np.zeros((n, len(predictor.classes)))
    for fold, probas in folds.items():
        thresholds = predictor.conformal["models"][str(fold)]["roi"]
        kept += prediction_sets(np.mean(probas, axis=0), predictor.classes, thresholds)
    members = kept > len(folds) / 2
    return set_text(members, predictor.classes), (members.sum(1) != 1).astype(object)


def predict_crops(predictor: Predictor, crops: np.ndarray) -> np.ndarray:
    """Mean class probabilities of ROI crops over the folds' models (and an ensemble's members).

    Parameters
    ----------
    predictor : Predictor
        See :func:`load_predictor`.
    crops : numpy.ndarray
        ``(n, S, S, 3)`` uint8, ``S`` the run's ``roi_size_px``.

    Returns
    -------
    numpy.ndarray
        ``(n, len(predictor.classes))`` float64; rows sum to 1.
    """
    if not len(crops):
        return np.zeros((0, len(predictor.classes)))
    return np.mean(list(_member_probabilities(predictor, crops).values()), axis=0)


def call_crops(
    predictor: Predictor, crops: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Probabilities, calls, positive scores and prediction sets of ROI crops.

    One model (or a soft vote): the call is the class of highest mean
    probability and the score its ``positive_label`` probability. A majority
    vote: the class most members call (ties: higher mean probability), the
    score the share of members calling ``positive_label``, as
    :func:`leukflow.evaluate.classifiers.vote_predictions` scores the run.

    Returns
    -------
    proba : numpy.ndarray
        ``(n, len(predictor.classes))`` float64, as :func:`predict_crops`.
    labels : numpy.ndarray
        ``(n,)`` str calls.
    scores : numpy.ndarray
        ``(n,)`` float64 in [0, 1].
    sets, review
        See :func:`deployed_sets`.
    """
    classes = np.asarray(predictor.classes, dtype=object)
    if not len(crops):
        empty = np.zeros(0, dtype=object)
        return np.zeros((0, len(classes))), empty, np.zeros(0), [], empty
    per_fold = _fold_probabilities(predictor, crops)
    members = _member_probabilities(predictor, crops, per_fold)
    sets, review = deployed_sets(predictor, per_fold)
    proba = np.mean(list(members.values()), axis=0)
    positive = predictor.positive_label
    if predictor.vote == "majority":
        calls = np.stack([classes[p.argmax(1)] for p in members.values()], axis=1)
        counts = np.stack([(calls == c).sum(1) for c in classes], axis=1).astype(float)
        call = classes[(counts + proba * 1e-3).argmax(1)]
        return proba, call, (calls == positive).mean(1), sets, review
    score = proba[:, predictor.classes.index(positive)] if positive in predictor.classes else 0.0
    score = np.broadcast_to(score, len(proba)).astype(float)
    return proba, classes[proba.argmax(1)], score, sets, review


@dataclass
class FieldPrediction:
    """What :func:`predict_field` finds in one image.

    Attributes
    ----------
    rois : pandas.DataFrame
        :data:`ROI_PREFIX_COLUMNS`, ``proba_<class>``, :data:`ROI_SUFFIX_COLUMNS`.
    image : dict
        One row of the image table (:data:`IMAGE_TABLE_COLUMNS`, ``overlay`` empty).
    rgb : numpy.ndarray or None
        The ``(H, W, 3)`` uint8 image, None when it could not be read.
    """

    rois: pd.DataFrame
    image: dict[str, Any]
    rgb: np.ndarray | None


def _segment(
    predictor: Predictor, rgb: np.ndarray, name: str
) -> tuple[pd.DataFrame, np.ndarray, str, str]:
    seg = segment_field(rgb, predictor.params)
    if seg.reason:
        return pd.DataFrame(), np.zeros((0,), np.uint8), seg.reason, seg.note
    rois, crops = field_rois(seg, name, predictor.params)
    return rois, crops, "", seg.note


def predict_images(
    predictor: Predictor,
    images: Iterable[tuple[str, np.ndarray | Path | str]],
    *,
    chunk_size: int = 8,
    max_chunk_pixels: int = MAX_CHUNK_PIXELS,
) -> Iterator[FieldPrediction]:
    """Segment and classify images, a chunk at a time.

    Parameters
    ----------
    predictor : Predictor
        See :func:`load_predictor`.
    images : iterable of (str, array or path)
        Name and either an ``(H, W, 3)`` uint8 array or an image file. A file
        that cannot be read gives a prediction with ``status`` ``error`` and
        the reason (:class:`leukflow.data.io.InvalidInputError` codes).
    chunk_size : int
        Images whose crops go through the encoders together.
    max_chunk_pixels : int
        A chunk also ends once its decoded images hold this many pixels, so a
        folder of large fields is not held ``chunk_size`` at a time (one image
        larger than this is a chunk of its own).

    Yields
    ------
    FieldPrediction
        One per image, in input order.
    """
    chunk: list[tuple[str, np.ndarray | None, str, str, pd.DataFrame, np.ndarray]] = []
    pixels = 0
    for name, source in images:
        try:
            rgb = source if isinstance(source, np.ndarray) else read_image(source)
            rois, crops, reason, note = _segment(predictor, rgb, name)
            chunk.append((name, rgb, reason, note, rois, crops))
            pixels += rgb.shape[0] * rgb.shape[1]
        except InvalidInputError as err:
            chunk.append((name, None, err.reason, str(err), pd.DataFrame(), np.zeros((0,))))
        if len(chunk) >= chunk_size or pixels >= max_chunk_pixels:
            yield from _classify_chunk(predictor, chunk)
            chunk, pixels = [], 0
    if chunk:
        yield from _classify_chunk(predictor, chunk)


def _classify_chunk(predictor: Predictor, chunk: list) -> Iterator[FieldPrediction]:
    with_rois = [c[5] for c in chunk if len(c[4])]
    crops = np.concatenate(with_rois) if with_rois else np.zeros((0,))
    proba, labels, scores, sets, review = call_crops(predictor, crops)
    start = 0
    for name, rgb, reason, message, rois, _crops in chunk:
        n = len(rois)
        part = slice(start, start + n)
        table = _roi_table(predictor, name, rois, proba[part], labels[part], scores[part],
                           sets[part], review[part])  # fmt: skip
        start += n
        yield FieldPrediction(table, _image_row(predictor, name, rgb, reason, message, table), rgb)


def _roi_table(
    predictor: Predictor, name: str, rois: pd.DataFrame, proba: np.ndarray, labels: np.ndarray,
    scores: np.ndarray, sets: list[str], review: np.ndarray,
) -> pd.DataFrame:  # fmt: skip
    cols = [*ROI_PREFIX_COLUMNS, *predictor.proba_columns, *ROI_SUFFIX_COLUMNS]
    if not len(rois):
        return pd.DataFrame(columns=cols)
    table = rois[ROI_PREFIX_COLUMNS[2:]].reset_index(drop=True)
    table.insert(0, "roi", np.arange(len(rois)))
    table.insert(0, "image", name)
    table[predictor.proba_columns] = proba
    table["label"] = [str(label) for label in labels]
    table["score"] = scores
    table["prediction_set"] = sets
    table["review"] = review
    return table[cols]


def _image_row(
    predictor: Predictor, name: str, rgb: np.ndarray | None, reason: str, message: str,
    rois: pd.DataFrame,
) -> dict[str, Any]:  # fmt: skip
    row = dict.fromkeys(IMAGE_TABLE_COLUMNS, "")
    row.update(image=name, reason=reason, message=message, n_rois=len(rois))
    if rgb is None:
        return row | {"status": "error", "width": 0, "height": 0, "score": np.nan}
    row.update(width=rgb.shape[1], height=rgb.shape[0], status="ok")
    if not len(rois):  # as aggregate_images calls an image without ROIs
        return row | {"label": predictor.negative_label, "score": 0.0, "pred_class": NO_ROI,
                      "reason": reason or "no_cell"}  # fmt: skip
    # the run's own aggregation; it takes the negative call from the labels it is given
    preds = rois.assign(classifier=predictor.classifier, image_id=name, roi_id=rois["roi"],
                        pred=rois["label"])  # fmt: skip
    images = pd.DataFrame({"image_id": [name], "label": [predictor.negative_label], "fold": [-1]})
    call = aggregate_images(
        preds,
        images,
        positive_label=predictor.positive_label,
        method=predictor.image_aggregation,
        threshold=predictor.any_positive_threshold,
    ).iloc[0]
    row.update(label=call["pred"], score=float(call["score"]), pred_class=call["pred_class"])
    if predictor.conformal is not None:  # the run's image rule over its cells' review marks
        share = float((rois["review"] == True).mean())  # noqa: E712 (object column)
        cut = 0.0 if predictor.conformal["image_rule"] == "any" else predictor.conformal[
            "image_review_share"]  # fmt: skip
        row["review"] = share > cut
    return row


# ------------------------------------------------------------------ overlays


def draw_overlay(rgb: np.ndarray, rois: pd.DataFrame, *, positive_label: str) -> np.ndarray:
    """Outline each ROI with its call and probability.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` uint8 image.
    rois : pandas.DataFrame
        Rows of a :class:`FieldPrediction`'s ``rois`` (``x0..y1``, ``label``,
        ``proba_<label>``).
    positive_label : str
        ROIs called this are outlined in red, the others in blue; a ROI
        marked ``review`` in orange, twice as thick, labelled with its set.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8 copy with boxes and labels drawn.
    """
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    width = max(2, round(min(im.size) / 240))
    font = ImageFont.load_default(size=max(12, round(min(im.size) / 32)))
    for r in rois.to_dict("records"):
        colour = (220, 20, 60) if r["label"] == positive_label else (30, 90, 230)
        review = r.get("review") is True
        if review:
            colour = (240, 130, 0)
        box = (int(r["x0"]), int(r["y0"]), int(r["x1"]) - 1, int(r["y1"]) - 1)
        draw.rectangle(box, outline=colour, width=2 * width if review else width)
        prob = r[PROBA_PREFIX + str(r["label"])]
        text = f"{r['roi']}: {r['label']} {prob:.2f}"
        if review:
            text = f"{r['roi']}: review {{{r['prediction_set'].replace('|', ', ')}}}"
        x, y = max(0, box[0]), max(0, box[1] - font.size - 4)
        bbox = draw.textbbox((x, y), text, font=font)
        draw.rectangle(bbox, fill=(255, 255, 255))
        draw.text((x, y), text, fill=colour, font=font)
    return np.asarray(im)


# ------------------------------------------------------------------- folders


def iter_image_paths(inputs: Sequence[str | Path]) -> Iterator[Path]:
    """Image files named on the command line: files as given, folders searched recursively.

    Folder contents are sorted and filtered by image suffix
    (:func:`leukflow.data.io.is_image_candidate`: an image of a refused format,
    such as GIF, is taken and reported ``unsupported_format``, never skipped);
    a file named explicitly is always taken (a bad one is reported, not skipped).

    Raises
    ------
    FileNotFoundError
        A named path does not exist.
    """
    for item in map(Path, inputs):
        if item.is_dir():
            for path in sorted(item.rglob("*")):
                if path.is_file() and is_image_candidate(path):
                    yield path
        elif item.exists():
            yield item
        else:
            raise FileNotFoundError(f"predict: {item} does not exist")


def _overlay_name(path: Path, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem) or "image"
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}_{n}.png"
    used.add(name)
    return name


def spreadsheet_safe(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Copy of ``table`` whose text cells in ``columns`` cannot start a spreadsheet formula.

    A cell starting with ``= + - @`` (or a tab or carriage return) gets a
    leading ``'``, as OWASP advises against CSV injection; a name such as
    ``=HYPERLINK(...).png`` is then shown as text, not run. Only text that a
    user gave (file names, messages naming them) needs it.
    """
    table = table.copy()
    for column in columns:
        if column in table:
            table[column] = [
                f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v
                for v in table[column]
            ]
    return table


#: Columns of predict's tables that hold user-given text.
USER_TEXT_COLUMNS = ("image", "message", "overlay")


def image_table_path(out: str | Path) -> Path:
    """Return the per-image table beside the per-ROI table ``out``: ``<stem>_images.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_images.csv")


def review_table_path(out: str | Path) -> Path:
    """Return the review queue beside the per-ROI table ``out``: ``<stem>_review.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_review.csv")


def review_queue(rois: pd.DataFrame) -> pd.DataFrame:
    """Select the ROIs marked ``review``, most uncertain first (:data:`REVIEW_COLUMNS`).

    ``confidence`` is the ROI's highest class probability; the queue is
    sorted by it, lowest first (ties: larger set first, then image and ROI).
    """
    flagged = rois[rois["review"] == True]  # noqa: E712 (object column: True, False or "")
    proba = flagged[[c for c in flagged.columns if c.startswith(PROBA_PREFIX)]]
    flagged = flagged.assign(
        confidence=proba.to_numpy(float).max(1) if len(flagged) else [],
        size=flagged["prediction_set"].str.count("[|]") + (flagged["prediction_set"] != ""),
    )
    flagged = flagged.sort_values(["confidence", "size", "image", "roi"],
                                  ascending=[True, False, True, True], kind="stable")  # fmt: skip
    return flagged[REVIEW_COLUMNS].reset_index(drop=True)


def predict_paths(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    *,
    out: str | Path,
    overlay_dir: str | Path | None = None,
    chunk_size: int | None = None,
    max_chunk_pixels: int = MAX_CHUNK_PIXELS,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Predict image files and folders; write the ROI table, image table and overlays.

    Parameters
    ----------
    predictor : Predictor
        See :func:`load_predictor`.
    inputs : sequence of str or Path
        Image files and folders (see :func:`iter_image_paths`).
    out : str or Path
        Per-ROI CSV (:data:`ROI_PREFIX_COLUMNS`, ``proba_<class>``,
        :data:`ROI_SUFFIX_COLUMNS`); the per-image CSV goes to
        :func:`image_table_path`, the cells marked ``review`` to
        :func:`review_table_path` (:func:`review_queue`). All are moved into
        place at the end.
    overlay_dir : str or Path, optional
        One PNG per readable image (default ``<out stem>_overlays/``).
    chunk_size : int, optional
        Images per encoder batch (default: the run's ``segmentation.chunk_size``).
    max_chunk_pixels : int
        Decoded pixels a batch holds at most (see :func:`predict_images`).
    progress : bool, optional
        Show a tqdm bar (default: when stderr is a terminal).

    Returns
    -------
    pandas.DataFrame
        The per-image table (:data:`IMAGE_TABLE_COLUMNS`), small: one row per
        image, with the names as given (the CSVs hold them through
        :func:`spreadsheet_safe`).
    """
    out = Path(out)
    overlay_dir = (
        Path(overlay_dir) if overlay_dir is not None else out.with_name(f"{out.stem}_overlays")
    )
    overlay_dir.mkdir(parents=True, exist_ok=True)
    chunk_size = chunk_size or predictor.chunk_size
    paths = list(iter_image_paths(inputs))
    used: set[str] = set()
    rows, flagged = [], []
    roi_cols = [*ROI_PREFIX_COLUMNS, *predictor.proba_columns, *ROI_SUFFIX_COLUMNS]
    with atomic_path(out) as tmp_rois:
        with open(tmp_rois, "w", newline="") as f:
            pd.DataFrame(columns=roi_cols).to_csv(f, index=False)
            results = predict_images(
                predictor, ((str(p), p) for p in paths), chunk_size=chunk_size,
                max_chunk_pixels=max_chunk_pixels,
            )  # fmt: skip
            bar = tqdm(results, total=len(paths), desc="predict", unit="image",
                       disable=None if progress is None else not progress)  # fmt: skip
            for pred, path in zip(bar, paths, strict=True):
                if len(pred.rois):
                    safe = spreadsheet_safe(pred.rois, USER_TEXT_COLUMNS)
                    safe.to_csv(f, index=False, header=False)
                    flagged.append(pred.rois[pred.rois["review"] == True])  # noqa: E712
                if pred.rgb is not None:
                    overlay = overlay_dir / _overlay_name(path, used)
                    png = draw_overlay(
                        pred.rgb, pred.rois, positive_label=predictor.positive_label
                    )
                    Image.fromarray(png).save(overlay)
                    pred.image["overlay"] = str(overlay)
                rows.append(pred.image)
        images = pd.DataFrame(rows, columns=IMAGE_TABLE_COLUMNS)
        with atomic_path(image_table_path(out)) as tmp_images:
            spreadsheet_safe(images, USER_TEXT_COLUMNS).to_csv(tmp_images, index=False)
        queue = review_queue(pd.concat(flagged, ignore_index=True)) if flagged else None
        with atomic_path(review_table_path(out)) as tmp_review:
            table = pd.DataFrame(columns=REVIEW_COLUMNS) if queue is None else queue
            spreadsheet_safe(table, USER_TEXT_COLUMNS).to_csv(tmp_review, index=False)
    return images
