"""Conformal prediction sets, abstention (``review``) and selective-classification metrics.

Each fold's model gets thresholds from its own calibration ROIs, which are
training ROIs of that fold, never its test ROIs. For the fitted classifiers
the calibration scores are cross-conformal: the fold's training part is split
into ``calibration_folds`` patient-grouped inner folds; the classifier (with
the hyperparameters the fold's fit chose, the encoder as trained) is refitted
without each inner fold and scores it. The model that is kept and scored is
the fold's one fit on its whole training part, so the main figures are the
same with conformal prediction on or off.

The nonconformity score of a label is ``1 - probability`` (LAC, least
ambiguous set-valued classifier); the threshold comes from the p-values of
:class:`crepes.ConformalClassifier` on the calibration scores and is kept as
a plain number (:func:`calibrate`), so a prediction set is every label whose
nonconformity is at most the threshold (:func:`prediction_sets`). A set that
is not exactly one label sends its cell to ``review``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from crepes import ConformalClassifier
from sklearn.base import clone
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline

from leukflow.evaluate.classifiers import (
    PROBA_PREFIX,
    _concat_rows,
    _fit,
    _test_rows,
    head_predictions,
    vote_predictions,
)
from leukflow.plan import CNN_SOFTMAX

log = logging.getLogger(__name__)

IMAGE_RULES = ("any", "share")
#: Separator of the labels of a prediction set written as text (``blast|lymphocyte``).
SET_SEPARATOR = "|"
#: Conformal and selective-classification columns of metrics.csv (NaN when off).
CONFORMAL_COLUMNS = [
    "conformal_alpha",
    "coverage",
    "set_size",
    "review_share",
    "kept_accuracy",
    "augrc",
    "calibration_n",
    "calibration_too_small",
]


@dataclass(frozen=True)
class ConformalSettings:
    """The config's ``evaluation.conformal`` keys (see config/config.yaml)."""

    enabled: bool = True
    alpha: float = 0.1
    mondrian: bool = False
    image_rule: str = "any"
    image_review_share: float = 0.5
    calibration_folds: int = 5

    @classmethod
    def from_config(cls, entry: Mapping | ConformalSettings | None) -> ConformalSettings:
        """Build from the config entry (None: the defaults)."""
        if isinstance(entry, ConformalSettings):
            return entry
        settings = cls(**dict(entry or {}))
        if settings.image_rule not in IMAGE_RULES:
            raise ValueError(
                f"evaluation.conformal.image_rule must be one of {IMAGE_RULES}; "
                f"got {settings.image_rule!r}"
            )
        if not 0 < settings.alpha < 1:
            raise ValueError(f"evaluation.conformal.alpha must be in (0, 1); got {settings.alpha}")
        return settings


def min_calibration(alpha: float) -> int:
    """Fewest calibration members for which a set can leave a label out: ``1/alpha - 1``."""
    return math.ceil(1 / alpha - 1 - 1e-9)


def _threshold(scores: np.ndarray, alpha: float) -> float | None:
    """Largest nonconformity kept at level ``alpha``; None: every label is kept.

    A label is kept when its crepes p-value (not smoothed, ``(#{calibration
    >= score} + 1) / (n + 1)``) exceeds ``alpha``; p-values change only at
    calibration scores, so the kept scores are those at most the largest
    calibration score still kept.
    """
    if len(scores) == 0:
        return None
    cc = ConformalClassifier()
    cc.fit(np.asarray(scores, dtype=float))
    beyond = cc.predict_p(np.array([[np.inf]]), smoothing=False)[0, 0]
    if beyond > alpha:  # n < 1/alpha - 1: even an unseen worst score is kept
        return None
    candidates = np.unique(scores)
    p = cc.predict_p(candidates[None, :], smoothing=False)[0]
    return float(candidates[p > alpha].max())


def calibrate(
    scores: np.ndarray, labels: np.ndarray, *, alpha: float, mondrian: bool, where: str
) -> dict:
    """Thresholds of one model from the nonconformity of its calibration members' true labels.

    Parameters
    ----------
    scores : numpy.ndarray
        ``(n,)`` float: ``1 - probability of the true label`` of each calibration member.
    labels : numpy.ndarray
        ``(n,)`` the members' true labels (the Mondrian classes).
    alpha : float
        Miscoverage level: sets hold the true label with probability >= 1 - alpha.
    mondrian : bool
        Class-conditional thresholds, one per label; a label with fewer than
        :func:`min_calibration` members falls back to the global threshold
        (with a warning).
    where : str
        Names the model in warnings.

    Returns
    -------
    dict
        Plain JSON: ``alpha, n, too_small, threshold`` (None: every label
        kept), ``mondrian``, ``class_thresholds`` and ``class_n`` (label ->
        value, Mondrian only) and ``fallback`` (labels on the global threshold).
    """
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(str)
    too_small = len(scores) < min_calibration(alpha)
    if too_small:
        log.warning(
            "%s: %d calibration members, fewer than 1/alpha - 1 = %d for alpha %g: every "
            "label is in every set (calibration_too_small in metrics.csv)",
            where, len(scores), min_calibration(alpha), alpha,
        )  # fmt: skip
    out = {"alpha": alpha, "n": len(scores), "too_small": bool(too_small),
           "threshold": _threshold(scores, alpha), "mondrian": bool(mondrian),
           "class_thresholds": {}, "class_n": {}, "fallback": []}  # fmt: skip
    if not mondrian:
        return out
    for label in sorted(set(labels.tolist())):
        mine = scores[labels == label]
        out["class_n"][label] = len(mine)
        if len(mine) < min_calibration(alpha):
            out["fallback"].append(label)
            continue
        out["class_thresholds"][label] = _threshold(mine, alpha)
    if out["fallback"]:
        log.warning(
            "%s: labels %s have fewer than %d calibration members; their sets use the "
            "global threshold instead of a class-conditional one",
            where, out["fallback"], min_calibration(alpha),
        )  # fmt: skip
    return out


def prediction_sets(proba: np.ndarray, classes: list[str], calibration: Mapping) -> np.ndarray:
    """Which labels each prediction set holds.

    Parameters
    ----------
    proba : numpy.ndarray
        ``(n, k)`` class probabilities, columns in ``classes`` order.
    classes : list of str
        The labels of ``proba``'s columns.
    calibration : mapping
        :func:`calibrate`'s thresholds (or the same read back from JSON).

    Returns
    -------
    numpy.ndarray
        ``(n, k)`` bool: label ``j`` is in row ``i``'s set.
    """
    per_class = calibration.get("class_thresholds", {})
    limits = []
    for label in classes:
        t = per_class.get(label, calibration["threshold"])
        limits.append(np.inf if t is None else t)
    return (1.0 - np.asarray(proba, dtype=float)) <= np.asarray(limits)[None, :]


def set_text(members: np.ndarray, classes: list[str]) -> list[str]:
    """Each row's set as text, labels joined by :data:`SET_SEPARATOR` ("" for an empty set)."""
    names = np.asarray(classes, dtype=object)
    return [SET_SEPARATOR.join(names[row]) for row in members]


def true_scores(preds: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``1 - probability of the true label`` of each prediction row, and the labels."""
    labels = preds["label"].astype(str).to_numpy()
    cols = [PROBA_PREFIX + label for label in labels]
    proba = preds.reindex(columns=sorted(set(cols)), fill_value=0.0)
    idx = proba.columns.get_indexer(cols)
    return 1.0 - proba.to_numpy(float)[np.arange(len(preds)), idx], labels


def cross_conformal_predictions(
    embeddings: Mapping[int, np.ndarray],
    rois: pd.DataFrame,
    models: Mapping[tuple[str, int], Pipeline],
    *,
    positive_label: str,
    calibration_folds: int,
) -> pd.DataFrame:
    """Out-of-inner-fold predictions of each fold's training ROIs: its calibration members.

    Parameters
    ----------
    embeddings, rois
        As :func:`leukflow.evaluate.classifiers.fit_predict_folds` (``rois``
        with ``group``; without it each image is its own group).
    models : mapping
        ``(classifier, fold)`` -> that fold's fitted pipeline; a clone with
        the same hyperparameters is refitted ``calibration_folds`` times on
        the fold's training part less one patient-grouped inner fold, and
        predicts that inner fold.
    positive_label : str
        The class whose probability is ``score``.
    calibration_folds : int
        Inner folds (fewer when the training part has fewer groups).

    Returns
    -------
    pandas.DataFrame
        Columns of :func:`.fit_predict_folds`: ``fold`` is the outer fold whose
        calibration the row belongs to; one row per training ROI of that fold.
    """
    labels = sorted(map(str, rois["label"].unique()))
    groups = (rois["group"] if "group" in rois else rois["image_id"]).astype(str).to_numpy()
    y = rois["label"].astype(str).to_numpy()
    out = []
    for (name, fold), model in sorted(models.items()):
        emb = np.asarray(embeddings[fold])
        train = np.flatnonzero((rois["fold"] != fold).to_numpy())
        # StratifiedGroupKFold needs a class with at least n_splits members
        largest_class = np.unique(y[train], return_counts=True)[1].max()
        n_splits = min(calibration_folds, len(np.unique(groups[train])), largest_class)
        if n_splits < 2:
            log.warning("%s fold %d: one patient group; no calibration members", name, fold)
            continue
        inner = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=0)
        with warnings.catch_warnings():
            # rare labels cannot be in every inner fold; fold_strata warned about them
            warnings.simplefilter("ignore", UserWarning)
            splits = list(inner.split(train, y[train], groups[train]))
        for k, (fit_idx, cal_idx) in enumerate(splits):
            fit_rows, cal_rows = train[fit_idx], train[cal_idx]
            where = f"{name} fold {fold} calibration part {k}"
            clf = _fit(clone(model), emb[fit_rows], y[fit_rows], where)
            mask = np.zeros(len(rois), dtype=bool)
            mask[cal_rows] = True
            out.append(
                _test_rows(rois, mask, name, fold, clf.predict(emb[cal_rows]),
                           clf.predict_proba(emb[cal_rows]), [str(c) for c in clf.classes_],
                           labels, positive_label)
            )  # fmt: skip
    return _concat_rows(out, labels)


def head_calibration_predictions(
    probs: Mapping[int, np.ndarray],
    classes: list[str],
    rois: pd.DataFrame,
    *,
    positive_label: str,
    name: str = CNN_SOFTMAX,
) -> pd.DataFrame:
    """Each fold's head softmax on that fold's *training* ROIs: the head's calibration members.

    The head was trained on those ROIs with its encoder, and there is no
    inner split to refit without retraining the encoder: its scores are
    in-sample, so its sets tend to be too small and coverage below 1 - alpha
    (metrics.csv shows by how much). Arguments as
    :func:`leukflow.evaluate.classifiers.head_predictions`; ``fold`` of a
    row is the fold whose calibration it belongs to.
    """
    parts = [head_predictions({}, classes, rois, positive_label=positive_label, name=name)]
    for fold, p in sorted(probs.items()):
        training = rois["fold"].to_numpy() != fold
        flipped = rois.assign(fold=np.where(training, fold, -(10**9)))
        parts.append(head_predictions({fold: p}, classes, flipped,
                                      positive_label=positive_label, name=name))  # fmt: skip
    return pd.concat(parts, ignore_index=True)


def vote_calibration_predictions(
    members: Mapping[str, pd.DataFrame], *, vote: str, positive_label: str, name: str
) -> pd.DataFrame | None:
    """Vote over the members' calibration rows: the ensemble's calibration members.

    ``members``: member -> its calibration predictions (one classifier each).
    None when a member has none (conformal prediction off when it was scored).
    """
    if any(m.empty for m in members.values()):
        return None
    return vote_predictions(members, vote=vote, positive_label=positive_label, name=name)


def image_probabilities(roi_preds: pd.DataFrame) -> pd.DataFrame:
    """Mean ROI probability of each label per ``classifier, fold, image_id``."""
    cols = [c for c in roi_preds.columns if c.startswith(PROBA_PREFIX)]
    return roi_preds.groupby(["classifier", "fold", "image_id"], sort=False)[cols].mean()


def _with_sets(preds: pd.DataFrame, calibration: Mapping) -> pd.DataFrame:
    """``preds`` with ``prediction_set``, ``set_size`` and ``covered`` from one calibration."""
    cols = [c for c in preds.columns if c.startswith(PROBA_PREFIX)]
    classes = [c.removeprefix(PROBA_PREFIX) for c in cols]
    members = prediction_sets(preds[cols].to_numpy(float), classes, calibration)
    truth = preds["label"].astype(str).to_numpy()[:, None] == np.asarray(classes)[None, :]
    return preds.assign(
        prediction_set=set_text(members, classes),
        set_size=members.sum(1),
        covered=(members & truth).any(1),
    )


def calibrate_folds(
    cal_preds: pd.DataFrame, settings: ConformalSettings
) -> dict[str, dict[str, dict]]:
    """ROI- and image-level thresholds of every classifier and fold from its calibration rows.

    Parameters
    ----------
    cal_preds : pandas.DataFrame
        Calibration predictions (:func:`cross_conformal_predictions`, or the
        same columns from a head or a vote).
        An image's calibration probabilities are its ROIs' mean, its label
        theirs (an image's ROIs carry its label).
    settings : ConformalSettings
        ``alpha`` and ``mondrian``.

    Returns
    -------
    dict
        classifier -> fold (text) -> ``{"roi": ..., "image": ...}``, each
        :func:`calibrate`'s plain-JSON thresholds.
    """
    image_label = cal_preds.drop_duplicates("image_id").set_index("image_id")["label"]
    per_image = image_probabilities(cal_preds).reset_index()
    per_image["label"] = per_image["image_id"].map(image_label.astype(str))
    out: dict[str, dict[str, dict]] = {}
    for (clf, fold), part in cal_preds.groupby(["classifier", "fold"], sort=True):
        where = f"{clf} fold {fold}"
        mine = per_image[(per_image["classifier"] == clf) & (per_image["fold"] == fold)]
        out.setdefault(str(clf), {})[str(fold)] = {
            level: calibrate(*true_scores(rows), alpha=settings.alpha,
                             mondrian=settings.mondrian, where=f"{where}, {level} level")
            for level, rows in (("roi", part), ("image", mine))
        }  # fmt: skip
    return out


def _uncalibrated(clf: str, fold: int) -> dict:
    """Stand-in thresholds of a fold without calibration members: every label kept."""
    log.warning("%s fold %s: no calibration members; every label is in every set", clf, fold)
    empty = {"alpha": None, "n": 0, "too_small": True, "threshold": None, "mondrian": False,
             "class_thresholds": {}, "class_n": {}, "fallback": []}  # fmt: skip
    return {"roi": empty, "image": empty}


def apply_conformal(
    roi_preds: pd.DataFrame,
    image_preds: pd.DataFrame,
    calibrations: Mapping[str, Mapping[str, Mapping]],
    settings: ConformalSettings,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prediction sets and ``review`` of every test ROI and image.

    A ROI is ``review`` when its set is not exactly one label. An image is
    ``review`` (``image_rule``) when any of its ROIs is (``any``), or when
    more than ``image_review_share`` of them are (``share``); an image without
    ROIs is not. The image's own set comes from its mean ROI probabilities and
    the image-level thresholds.

    Returns
    -------
    roi_preds, image_preds : pandas.DataFrame
        With ``prediction_set`` (labels joined by :data:`SET_SEPARATOR`),
        ``set_size``, ``covered`` (true label in the set) and ``review``;
        images also ``review_rois`` (how many of their ROIs are ``review``).
    """
    rois, imgs = [], []
    probs = image_probabilities(roi_preds)
    for (clf, fold), part in roi_preds.groupby(["classifier", "fold"], sort=False):
        cal = calibrations.get(str(clf), {}).get(str(fold)) or _uncalibrated(clf, fold)
        part = _with_sets(part, cal["roi"])
        rois.append(part.assign(review=part["set_size"] != 1))
    roi_out = pd.concat(rois, ignore_index=True) if rois else roi_preds
    flagged = roi_out.groupby(["classifier", "fold", "image_id"])["review"].agg(["sum", "mean"])
    keys = ["classifier", "fold", "image_id"]
    image_out = image_preds.merge(probs.reset_index(), on=keys, how="left")
    for (clf, fold), part in image_out.groupby(["classifier", "fold"], sort=False):
        cal = calibrations.get(str(clf), {}).get(str(fold)) or _uncalibrated(clf, fold)
        has = part.index[part["n_rois"] > 0]
        if len(has):
            imgs.append(_with_sets(part.loc[has], cal["image"]))
    sets = pd.concat(imgs) if imgs else pd.DataFrame()
    for col in ("prediction_set", "set_size", "covered"):
        image_out[col] = sets[col] if col in sets else np.nan
    image_out = image_out.join(flagged, on=keys)
    share = image_out["mean"].fillna(0.0)
    cut = share > 0 if settings.image_rule == "any" else share > settings.image_review_share
    image_out = image_out.assign(review=cut, review_rois=image_out["sum"].fillna(0).astype(int))
    proba_cols = [c for c in image_out.columns if c.startswith(PROBA_PREFIX)]
    return roi_out, image_out.drop(columns=[*proba_cols, "sum", "mean"])


def augrc(confidence: np.ndarray, correct: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Area under the generalised risk-coverage curve (Traub et al. 2024).

    Predictions are accepted from the most confident down; at each distinct
    confidence the curve has the share accepted (coverage) and the share
    both accepted and wrong (generalised risk, over all predictions). Ties
    are accepted together; the area is the trapezoid rule from (0, 0).
    Lower is better: a perfect ranking with error rate ``e`` gives ``e**2 / 2``,
    a random one ``e / 2``.

    Returns
    -------
    value : float
        The area (NaN without predictions).
    coverage, risk : numpy.ndarray
        The curve's points, from (0, 0) to (1, error rate).
    """
    confidence = np.asarray(confidence, dtype=float)
    wrong = ~np.asarray(correct, dtype=bool)
    n = len(confidence)
    if n == 0:
        return float("nan"), np.zeros(1), np.zeros(1)
    order = np.argsort(-confidence, kind="stable")
    c, errors = confidence[order], np.cumsum(wrong[order])
    ends = np.r_[np.flatnonzero(np.diff(c) != 0), n - 1]
    coverage = np.r_[0.0, (ends + 1) / n]
    risk = np.r_[0.0, errors[ends] / n]
    return float(np.trapezoid(risk, coverage)), coverage, risk


def confidence_and_correct(preds: pd.DataFrame, level: str) -> tuple[np.ndarray, np.ndarray]:
    """Confidence (highest class probability) and multi-class correctness of predictions.

    ROI level: ``proba_<label>`` columns and ``pred``; image level: the
    ``confidence`` column and ``pred_class`` (images without ROIs left out).
    """
    if level == "roi":
        cols = [c for c in preds.columns if c.startswith(PROBA_PREFIX)]
        conf = preds[cols].to_numpy(float).max(1) if cols else np.ones(len(preds))
        return conf, (preds["pred"].astype(str) == preds["label"].astype(str)).to_numpy()
    preds = preds[preds["n_rois"] > 0]
    return (
        preds["confidence"].to_numpy(float),
        (preds["pred_class"].astype(str) == preds["label"].astype(str)).to_numpy(),
    )


def _selective_row(preds: pd.DataFrame, level: str) -> dict[str, float]:
    """Coverage, set size, review share, kept accuracy and AUGRC of one set of predictions."""
    conf, correct = confidence_and_correct(preds, level)
    row = {"augrc": augrc(conf, correct)[0]}
    if "review" not in preds:
        return row
    has = preds.dropna(subset=["set_size"]) if level == "image" else preds
    review = preds["review"].to_numpy(bool)
    call = preds["pred"] if level == "roi" else preds["pred_class"]
    kept = (call.astype(str) == preds["label"].astype(str)).to_numpy()[~review]
    row.update(
        coverage=float(has["covered"].astype(bool).mean()) if len(has) else float("nan"),
        set_size=float(has["set_size"].astype(float).mean()) if len(has) else float("nan"),
        review_share=float(review.mean()) if len(review) else float("nan"),
        kept_accuracy=float(kept.mean()) if len(kept) else float("nan"),
    )
    return row


def score_selective(
    levels: Mapping[str, pd.DataFrame],
    calibrations: Mapping[str, Mapping[str, Mapping]] | None,
    alpha: float | None,
) -> pd.DataFrame:
    """Score :data:`CONFORMAL_COLUMNS` per classifier, level, fold, ``mean``, ``std``, ``pooled``.

    Parameters
    ----------
    levels : mapping
        ``roi`` and ``image`` -> predictions (after :func:`apply_conformal`
        when conformal prediction is on; AUGRC is computed either way).
    calibrations : mapping or None
        :func:`calibrate_folds`'s thresholds (None: conformal prediction off,
        the conformal columns are NaN). ``calibration_n`` is the fold's
        calibration size (pooled: the smallest fold's);
        ``calibration_too_small`` whether it is under 1/alpha - 1 (pooled: any fold).
    alpha : float or None
        The level, for ``conformal_alpha``.
    """
    rows = []
    for level, preds in levels.items():
        for clf, part in preds.groupby("classifier", sort=True):
            per_fold = []
            for fold, rows_ in part.groupby("fold", sort=True):
                cal = (calibrations or {}).get(str(clf), {}).get(str(fold), {}).get(level)
                row = {"classifier": clf, "level": level, "fold": str(fold),
                       **_selective_row(rows_, level)}  # fmt: skip
                if cal is not None:
                    row.update(calibration_n=cal["n"], calibration_too_small=cal["too_small"])
                per_fold.append(row)
            folds = pd.DataFrame(per_fold)
            values = folds.drop(columns=["classifier", "level", "fold"])
            pooled = {**_selective_row(part, level), "classifier": clf, "level": level,
                      "fold": "pooled"}  # fmt: skip
            if "calibration_n" in folds:
                too_small = bool(folds["calibration_too_small"].any())
                pooled.update(calibration_n=folds["calibration_n"].min(),
                              calibration_too_small=too_small)  # fmt: skip
            summary = [
                {"classifier": clf, "level": level, "fold": "mean", **values.mean().to_dict()},
                {"classifier": clf, "level": level, "fold": "std",
                 **values.std(ddof=1).to_dict()},
                pooled,
            ]  # fmt: skip
            rows.extend([*per_fold, *summary])
    table = pd.DataFrame(rows).reindex(columns=["classifier", "level", "fold", *CONFORMAL_COLUMNS])
    table["conformal_alpha"] = alpha if calibrations is not None else np.nan
    summary = table["fold"].isin(["mean", "std"])
    table.loc[summary, ["calibration_n", "calibration_too_small"]] = np.nan
    return table
