"""Evaluate: classical classifiers on fold embeddings, and their metrics.

Fold ``f``'s classifier is fitted on the training ROIs of fold ``f`` embedded
by fold ``f``'s encoder (trained on those same ROIs), and scored on that
fold's test ROIs; nothing it sees comes from the test patients.

Metrics come three ways: per test fold (with mean and std over the folds);
on the pooled out-of-fold predictions with a bootstrap confidence interval
that resamples whole patient groups, since ROIs and fields of one patient
are not independent; and per class (precision, recall, F1, macro and
weighted averages) for datasets with several labels.
"""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import skops.io
from scipy.sparse import csr_matrix
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from leukflow.data.io import InvalidInputError, atomic_path
from leukflow.evaluate.folds import check_no_leakage

log = logging.getLogger(__name__)

#: Binary metrics (positive label vs the rest), in the column order of metrics.csv.
#: Brier score: lower is better; every other metric: higher is better.
METRICS = [
    "accuracy",
    "precision",
    "sensitivity",
    "specificity",
    "f1",
    "roc_auc",
    "balanced_accuracy",
    "pr_auc",
    "brier",
]
COUNTS = ["tn", "fp", "fn", "tp", "n"]
#: Columns of the ``pooled`` rows: the metric named, and its bootstrap interval.
CI_COLUMNS = ["metric", "ci_low", "ci_high"]
CLASSIFIERS = ("random_forest", "knn", "svm_rbf", "svm_linear", "logistic_regression")
#: The encoder's own head (its softmax, read from the embedding store): a classifier
#: that is not fitted here.
CNN_SOFTMAX = "cnn_softmax"
VOTES = ("soft", "majority")
AGGREGATIONS = ("vote", "mean_probability", "any_positive")
#: Inner folds of the Platt scaling of the SVMs (inside each training part).
CALIBRATION_FOLDS = 5
#: Per-class probability columns of the ROI predictions: ``proba_<label>``.
PROBA_PREFIX = "proba_"
#: ``pred_class`` of an image in which no white cell was found.
NO_ROI = "no_roi"


# ----------------------------------------------------------------- classifiers


def make_classifier(name: str, params: Mapping) -> Pipeline:
    """Build a scikit-learn pipeline (standardisation, optional PCA, model).

    Parameters
    ----------
    name : str
        One of :data:`CLASSIFIERS`: ``random_forest``, ``knn``, ``svm_rbf``,
        ``svm_linear`` (linear SVM, meant for HOG features) or
        ``logistic_regression``.
    params : mapping
        The classifier's config entry (see the schema). ``pca_components``
        (absent or None: no PCA step) projects the standardised features on
        that many principal components before the model.

    Returns
    -------
    sklearn.pipeline.Pipeline
        Steps ``scale``, ``pca`` (only with ``pca_components``), ``model``.
        Both SVMs give probabilities by Platt scaling on
        :data:`CALIBRATION_FOLDS` inner folds of the training part.
    """
    if name == "random_forest":
        model = RandomForestClassifier(
            n_estimators=params["n_estimators"], random_state=params["seed"], n_jobs=1
        )
    elif name == "knn":
        model = KNeighborsClassifier(n_neighbors=params["n_neighbors"])
    elif name == "svm_rbf":
        model = CalibratedClassifierCV(
            SVC(kernel="rbf", C=params["C"]), cv=CALIBRATION_FOLDS, ensemble=False
        )
    elif name == "svm_linear":
        model = CalibratedClassifierCV(
            LinearSVC(C=params["C"], max_iter=params["max_iter"]),
            cv=CALIBRATION_FOLDS,
            ensemble=False,
        )
    elif name == "logistic_regression":
        model = LogisticRegression(C=params["C"], max_iter=params["max_iter"])
    else:
        raise ValueError(
            f"make_classifier: unknown classifier {name!r}; expected one of {CLASSIFIERS}"
        )
    steps = [("scale", StandardScaler())]
    pca = params.get("pca_components")  # optional: a plain mapping may leave it out
    grid = params.get("grid") or {}
    if pca is None and grid.get("pca_components"):
        pca = grid["pca_components"][0]  # a PCA step whose size the inner CV chooses
    if pca is not None:
        steps.append(("pca", PCA(n_components=int(pca), random_state=0)))
    return Pipeline([*steps, ("model", model)])


def grid_parameter(name: str, key: str) -> str:
    """Name the pipeline parameter behind a config grid key (``C``: ``model__estimator__C``)."""
    if key == "pca_components":
        return "pca__n_components"
    if name in ("svm_rbf", "svm_linear"):
        return f"model__estimator__{key}"
    return f"model__{key}"


def _fit(
    pipe: Pipeline,
    x: np.ndarray,
    y: np.ndarray,
    where: str,
    *,
    groups: np.ndarray | None = None,
    grid: Mapping[str, list] | None = None,
    inner_folds: int = 3,
) -> Pipeline:
    """Fit ``pipe``, shrinking PCA and leaving out classes Platt scaling cannot split.

    With a ``grid`` (config key -> candidate values), the values are chosen by
    an inner :class:`~sklearn.model_selection.StratifiedGroupKFold` on this
    training part only (``groups``: patient groups, so the inner test folds
    hold unseen patients), scored by balanced accuracy; the pipeline refitted
    on the whole training part with the best values is returned.
    """
    most = min(x.shape)
    if "pca" in pipe.named_steps:
        if pipe.named_steps["pca"].n_components > most:
            log.warning(
                "%s: pca_components lowered to %d (training part is %s)", where, most, x.shape
            )
            pipe.set_params(pca__n_components=most)
    if isinstance(pipe.named_steps["model"], CalibratedClassifierCV):
        labels, counts = np.unique(y, return_counts=True)
        rare = labels[counts < CALIBRATION_FOLDS]
        if len(rare) and len(rare) < len(labels) - 1:
            log.warning(
                "%s: labels %s have fewer than %d training ROIs, too few for the SVM's inner "
                "Platt-scaling folds; left out of this fold's training part (never predicted)",
                where,
                list(rare),
                CALIBRATION_FOLDS,
            )
            keep = ~np.isin(y, rare)
            x, y = x[keep], y[keep]
            groups = None if groups is None else groups[keep]
    if not grid:
        return pipe.fit(x, y)
    if groups is None:
        raise ValueError(f"{where}: tuning a grid needs the patient group of every ROI")
    n_splits = min(inner_folds, len(np.unique(groups)))
    if n_splits < 2:
        log.warning("%s: one patient group in the training part; grid not searched", where)
        return pipe.fit(x, y)
    name = where.split(" ")[0]
    param_grid = {
        grid_parameter(name, key): [min(v, most) if key == "pca_components" else v for v in vals]
        for key, vals in grid.items()
    }
    search = GridSearchCV(
        pipe,
        param_grid,
        cv=StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=0),
        scoring="balanced_accuracy",
        n_jobs=1,
    )
    with warnings.catch_warnings():
        # rare labels cannot be in every inner fold; fold_strata warned about them
        warnings.simplefilter("ignore", UserWarning)
        search.fit(x, y, groups=groups)
    log.info(
        "%s: inner %d-fold grouped CV chose %s (balanced accuracy %.3f)",
        where,
        n_splits,
        search.best_params_,
        search.best_score_,
    )
    return search.best_estimator_


def fit_predict_folds(
    embeddings: Mapping[int, np.ndarray],
    rois: pd.DataFrame,
    *,
    classifiers: Mapping[str, Mapping],
    positive_label: str,
    return_models: bool = False,
    inner_folds: int = 3,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[tuple[str, int], Pipeline]]:
    """Fit every classifier on each fold's training ROIs and predict its test ROIs.

    Parameters
    ----------
    embeddings : mapping of int to numpy.ndarray
        Fold -> ``(n_rois, dim)`` embeddings of *all* ROIs by that fold's encoder,
        row-aligned with ``rois``.
    rois : pandas.DataFrame
        ``roi_id, image_id, label, fold`` and, for classifiers with a ``grid``,
        ``group`` (the patient group). ROIs of fold -1 (a holdout split's
        training-only images) are trained on in every fold, never tested.
    classifiers : mapping
        Classifier name -> parameters (see :func:`make_classifier`); an
        optional ``grid`` (parameter -> candidate values) is searched by an
        inner grouped CV of ``inner_folds`` folds on each training part.
    positive_label : str
        The class whose probability is reported as ``score``.
    return_models : bool
        Also return the fitted pipelines. A fold without test ROIs then still
        gets a fitted model (on all its training ROIs); otherwise it is skipped.
    inner_folds : int
        Inner folds of the grid search.

    Returns
    -------
    predictions : pandas.DataFrame
        ``classifier, fold, roi_id, image_id, label, pred, score`` and one
        ``proba_<label>`` column per label of ``rois`` (0 for a label absent
        from the fold's training part) for every test ROI.
    models : dict of (str, int) to Pipeline
        Only with ``return_models``: (classifier, fold) -> fitted pipeline.
    """
    labels = sorted(map(str, rois["label"].unique()))
    proba_cols = [PROBA_PREFIX + str(label) for label in labels]
    out, models = [], {}
    for fold, emb in sorted(embeddings.items()):
        if len(emb) != len(rois):
            raise ValueError(
                f"fit_predict_folds: fold {fold} has {len(emb)} rows, {len(rois)} ROIs"
            )
        train = (rois["fold"] != fold).to_numpy()
        test = ~train
        if not test.any() and not return_models:
            continue
        y_train = rois.loc[train, "label"].to_numpy()
        g_train = rois.loc[train, "group"].to_numpy() if "group" in rois else None
        for name, params in classifiers.items():
            clf = _fit(
                make_classifier(name, params),
                emb[train],
                y_train,
                f"{name} fold {fold}",
                groups=g_train,
                grid=params.get("grid"),
                inner_folds=inner_folds,
            )
            models[(name, fold)] = clf
            if not test.any():
                continue
            classes = [str(c) for c in clf.classes_]
            proba = clf.predict_proba(emb[test])
            full = np.zeros((int(test.sum()), len(labels)))
            for j, c in enumerate(classes):
                full[:, labels.index(c)] = proba[:, j]
            score = proba[:, classes.index(positive_label)] if positive_label in classes else 0.0
            out.append(
                rois.loc[test, ["roi_id", "image_id", "label"]]
                .assign(classifier=name, fold=fold, pred=clf.predict(emb[test]), score=score)
                .reset_index(drop=True)
                .join(pd.DataFrame(full, columns=proba_cols))
            )
    cols = ["classifier", "fold", "roi_id", "image_id", "label", "pred", "score", *proba_cols]
    preds = pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)
    return (preds, models) if return_models else preds


def head_predictions(
    probs: Mapping[int, np.ndarray],
    classes: list[str],
    rois: pd.DataFrame,
    *,
    positive_label: str,
    name: str = CNN_SOFTMAX,
) -> pd.DataFrame:
    """ROI predictions of the end-to-end CNN: each fold's head softmax on its test ROIs.

    Parameters
    ----------
    probs : mapping of int to numpy.ndarray
        Fold -> ``(n_rois, n_classes)`` softmax of that fold's encoder head for
        *all* ROIs, row-aligned with ``rois`` (the store's ``probs/`` arrays).
    classes : list of str
        The head's classes, in column order.
    rois : pandas.DataFrame
        ``roi_id, image_id, label, fold``.
    positive_label : str
        The class whose probability is ``score``.
    name : str
        The ``classifier`` value of the rows.

    Returns
    -------
    pandas.DataFrame
        As :func:`fit_predict_folds`: ``pred`` is the class of highest
        probability; a label the head does not know has probability 0.
    """
    labels = sorted(map(str, rois["label"].unique()))
    classes = [str(c) for c in classes]
    proba_cols = [PROBA_PREFIX + label for label in labels]
    out = []
    for fold, p in sorted(probs.items()):
        p = np.asarray(p, dtype=float)
        if p.shape != (len(rois), len(classes)):
            raise ValueError(
                f"head_predictions: fold {fold} has probabilities of shape {p.shape}; "
                f"expected ({len(rois)}, {len(classes)}) for the ROIs and classes {classes}"
            )
        test = (rois["fold"] == fold).to_numpy()
        if not test.any():
            continue
        full = np.zeros((int(test.sum()), len(labels)))
        for j, c in enumerate(classes):
            if c in labels:
                full[:, labels.index(c)] = p[test, j]
        score = p[test, classes.index(positive_label)] if positive_label in classes else 0.0
        out.append(
            rois.loc[test, ["roi_id", "image_id", "label"]]
            .assign(
                classifier=name,
                fold=fold,
                pred=np.asarray(classes)[p[test].argmax(1)],
                score=score,
            )
            .reset_index(drop=True)
            .join(pd.DataFrame(full, columns=proba_cols))
        )
    cols = ["classifier", "fold", "roi_id", "image_id", "label", "pred", "score", *proba_cols]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def vote_predictions(
    members: Mapping[str, pd.DataFrame],
    *,
    vote: str,
    positive_label: str,
    name: str,
) -> pd.DataFrame:
    """Combine the ROI predictions of several models into an ensemble's.

    Parameters
    ----------
    members : mapping of str to pandas.DataFrame
        Member name (e.g. ``mobilenet/cnn_softmax``) -> its ROI predictions
        (:func:`fit_predict_folds` or :func:`head_predictions`, one classifier
        each). Every member must predict the same ``(fold, roi_id)`` pairs.
    vote : str
        ``soft``: mean of the members' class probabilities, ``pred`` its
        highest class, ``score`` the mean probability of ``positive_label``.
        ``majority``: ``pred`` is the class most members call (a tie goes to
        the higher mean probability), ``score`` the share of members calling
        ``positive_label``.
    positive_label : str
        The positive class.
    name : str
        The ensemble's ``classifier`` value.

    Returns
    -------
    pandas.DataFrame
        ROI predictions in the columns of :func:`fit_predict_folds`.
    """
    if vote not in VOTES:
        raise ValueError(f"vote_predictions: vote must be one of {VOTES}; got {vote!r}")
    if len(members) < 2:
        raise ValueError(f"vote_predictions: {name} needs >= 2 members; got {list(members)}")
    key = ["fold", "roi_id"]
    first_name, first = next(iter(members.items()))
    base = first.sort_values(key).reset_index(drop=True)
    labels = sorted({c for m in members.values() for c in m.columns if c.startswith(PROBA_PREFIX)})
    probas, calls = [], []
    for member, preds in members.items():
        preds = preds.sort_values(key).reset_index(drop=True)
        if len(preds) != len(base) or not preds[key].equals(base[key]):
            raise ValueError(
                f"vote_predictions: {member} predicts other ROIs or folds than {first_name} "
                f"({len(preds)} vs {len(base)} rows)"
            )
        probas.append(preds.reindex(columns=labels, fill_value=0.0).to_numpy(float))
        calls.append(preds["pred"].astype(str).to_numpy())
    mean = np.mean(probas, axis=0)
    classes = [c.removeprefix(PROBA_PREFIX) for c in labels]
    if vote == "soft":
        pred = np.asarray(classes)[mean.argmax(1)]
        score = mean[:, classes.index(positive_label)] if positive_label in classes else 0.0
    else:
        calls = np.stack(calls, axis=1)  # (n, n_members)
        counts = np.stack([(calls == c).sum(1) for c in classes], axis=1).astype(float)
        pred = np.asarray(classes)[(counts + mean * 1e-3).argmax(1)]  # ties: mean probability
        score = (calls == positive_label).mean(1)
    out = base[["fold", "roi_id", "image_id", "label"]].assign(
        classifier=name, pred=pred, score=score
    )
    out = out.join(pd.DataFrame(mean, columns=labels))
    return out[["classifier", "fold", "roi_id", "image_id", "label", "pred", "score", *labels]]


# ---------------------------------------------------------------- model files


def save_model(model: Pipeline, path: str | Path) -> None:
    """Write a fitted pipeline in the skops format (no pickle), atomically.

    What it writes must load with :func:`load_model`: a classifier made of
    another type needs that type added to :data:`TRUSTED_MODEL_TYPES`.
    """
    with atomic_path(path) as tmp:
        skops.io.dump(model, tmp)


#: Every type a model file written by :func:`save_model` is made of: the
#: pipelines :func:`make_classifier` builds, fitted, and the containers and
#: arrays skops stores them with. A file that names any other type is refused,
#: however harmless its name looks (a callable can sit under ``sklearn.``).
TRUSTED_MODEL_TYPES = frozenset({
    "builtins.dict", "builtins.list", "builtins.str", "builtins.tuple",
    "numpy.ndarray", "numpy.float32", "numpy.float64", "numpy.int64",
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.decomposition._pca.PCA",
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._tree.Tree",
    "sklearn.neighbors._classification.KNeighborsClassifier",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.calibration.CalibratedClassifierCV",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.svm._classes.SVC",
    "sklearn.svm._classes.LinearSVC",
    "sklearn.linear_model._logistic.LogisticRegression",
})  # fmt: skip
#: The skops node kinds those types are stored as; functions, methods and
#: operators (which could be called by whoever uses the model) are not among them.
TRUSTED_NODE_KINDS = frozenset({
    "DictNode", "JsonNode", "ListNode", "NdArrayNode", "ObjectNode", "TreeNode", "TupleNode",
    "TypeNode",
})  # fmt: skip


def load_model(path: str | Path) -> Pipeline:
    """Read a pipeline written by :func:`save_model`, trusting only known types.

    Every node of the file is checked against :data:`TRUSTED_MODEL_TYPES` and
    :data:`TRUSTED_NODE_KINDS` before anything is built from it, and skops
    is then told to trust exactly the types found, so a crafted file in a
    results folder someone else made cannot bring in a callable.

    Raises
    ------
    InvalidInputError
        ``untrusted_model`` naming the file and every type it would need
        beyond the list; ``unreadable`` when it is not a skops archive.
    """
    found = _skops_types(path)
    foreign = sorted(
        f"{name} ({kind})"
        for kind, name in found
        if name not in TRUSTED_MODEL_TYPES or kind not in TRUSTED_NODE_KINDS
    )
    foreign += sorted(
        f"{name} (skops)"
        for name in skops.io.get_untrusted_types(file=path)
        if name not in TRUSTED_MODEL_TYPES
    )
    if foreign:
        raise InvalidInputError(
            "untrusted_model",
            f"{path}: holds types leukflow does not fit, refused: {', '.join(foreign)}",
        )
    return skops.io.load(path, trusted=sorted({name for _, name in found}))


def _skops_types(path: str | Path) -> set[tuple[str, str]]:
    """``(node kind, module.type)`` of every node in a skops file's schema."""
    try:
        with zipfile.ZipFile(path) as archive:
            schema = json.loads(archive.read("schema.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise InvalidInputError(
            "unreadable", f"{path}: not a skops model file ({type(err).__name__}: {err})"
        ) from err
    found: set[tuple[str, str]] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "__class__" in node or "__loader__" in node:
                name = f"{node.get('__module__')}.{node.get('__class__')}"
                found.add((str(node.get("__loader__")), name))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


# ------------------------------------------------------------- image level


def aggregate_images(
    roi_predictions: pd.DataFrame,
    images: pd.DataFrame,
    *,
    positive_label: str,
    method: str = "vote",
    threshold: float = 0.5,
) -> pd.DataFrame:
    """Turn ROI predictions into one call per image.

    Parameters
    ----------
    roi_predictions : pandas.DataFrame
        Output of :func:`fit_predict_folds`.
    images : pandas.DataFrame
        ``image_id, label, fold`` of every image, those without ROIs included:
        they are called negative with score 0 (no white cell, no blast seen).
        The negative call is the one other label when there are two, else
        ``not_<positive_label>``.
    positive_label : str
        The positive class.
    method : str
        ``vote``: positive when at least half of the ROIs are predicted
        positive, score = that share; ``mean_probability``: score = mean ROI
        score, positive when >= 0.5; ``any_positive``: score = highest ROI
        score, positive when >= ``threshold`` (one blast makes the smear).
    threshold : float
        The ``any_positive`` threshold.

    Returns
    -------
    pandas.DataFrame
        ``classifier, fold, image_id, label, pred, score, n_rois, pred_class``.
        ``pred`` is the binary call; ``pred_class`` the multi-class call: the
        most frequent ROI prediction (``vote``; ties go to the higher mean
        probability) or the label of highest mean ROI probability (the other
        methods), :data:`NO_ROI` for an image without ROIs.
    """
    if method not in AGGREGATIONS:
        raise ValueError(
            f"aggregate_images: method must be one of {', '.join(AGGREGATIONS)}; got {method!r}"
        )
    others = sorted(set(images["label"]) - {positive_label})
    negative = others[0] if len(others) == 1 else "not_" + positive_label
    proba_cols = [c for c in roi_predictions.columns if c.startswith(PROBA_PREFIX)]
    rows = []
    for clf, preds in roi_predictions.groupby("classifier", sort=False):
        per_image = preds.groupby("image_id").agg(
            vote=("pred", lambda p: float(np.mean(p == positive_label))),
            mean_probability=("score", "mean"),
            any_positive=("score", "max"),
            n_rois=("roi_id", "size"),
        )
        per_image["pred_class"] = _class_calls(preds, proba_cols, method)
        merged = images[["image_id", "label", "fold"]].merge(
            per_image, left_on="image_id", right_index=True, how="left"
        )
        score = merged[method].fillna(0.0)
        cut = threshold if method == "any_positive" else 0.5
        rows.append(
            merged[["image_id", "label", "fold"]].assign(
                classifier=clf,
                pred=np.where(score >= cut, positive_label, negative),
                score=score,
                n_rois=merged["n_rois"].fillna(0).astype(int),
                pred_class=merged["pred_class"].fillna(NO_ROI).astype(str),
            )
        )
    cols = ["classifier", "fold", "image_id", "label", "pred", "score", "n_rois", "pred_class"]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)


def _class_calls(preds: pd.DataFrame, proba_cols: list[str], method: str) -> pd.Series:
    """Multi-class call per image from its ROIs (see :func:`aggregate_images`)."""
    votes = pd.crosstab(preds["image_id"], preds["pred"]).astype(float)
    if not proba_cols:
        return votes.idxmax(axis=1)
    mean = preds.groupby("image_id")[proba_cols].mean()
    mean.columns = [c.removeprefix(PROBA_PREFIX) for c in proba_cols]
    if method != "vote":
        return mean.idxmax(axis=1)
    # a tie in votes goes to the label of higher mean probability (< 1 vote)
    return votes.add(mean.reindex(columns=votes.columns, fill_value=0.0) * 1e-3).idxmax(axis=1)


# ------------------------------------------------------------ binary metrics


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def binary_metrics(
    labels: pd.Series, preds: pd.Series, scores: pd.Series, *, positive_label: str
) -> dict[str, float]:
    """Compute the :data:`METRICS` and :data:`COUNTS` of one set of predictions.

    Every label other than ``positive_label`` counts as negative. Balanced
    accuracy is the mean of sensitivity and specificity (the one defined when
    only one class is present, as scikit-learn does); PR-AUC is the average
    precision (the step-wise area under the precision-recall curve); Brier is
    the mean squared difference between ``scores`` and the 0/1 truth. A ratio
    with a zero denominator, and ROC-AUC and PR-AUC on a single class, are NaN.
    """
    y = np.asarray(labels) == positive_label
    p = np.asarray(preds) == positive_label
    s = np.asarray(scores, dtype=float)
    tn, fp, fn, tp = confusion_matrix(y, p, labels=[False, True]).ravel().tolist()
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    both = 0 < y.sum() < len(y)
    defined = [v for v in (sensitivity, specificity) if not np.isnan(v)]
    return {
        "accuracy": _ratio(tp + tn, len(y)),
        "precision": _ratio(tp, tp + fp),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": float(roc_auc_score(y, s)) if both else float("nan"),
        "balanced_accuracy": float(np.mean(defined)) if defined else float("nan"),
        "pr_auc": float(average_precision_score(y, s)) if both else float("nan"),
        "brier": float(np.mean((s - y) ** 2)) if len(y) else float("nan"),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        "n": len(y),
    }


def score_folds(predictions: pd.DataFrame, *, positive_label: str) -> pd.DataFrame:
    """Metrics per classifier and fold, plus ``mean`` and ``std`` rows over the folds.

    Returns
    -------
    pandas.DataFrame
        ``classifier, fold`` (an int as text, ``mean`` or ``std``), :data:`METRICS`,
        :data:`COUNTS`. Mean and std rows leave the counts empty; std is the
        sample standard deviation (ddof=1) over folds.
    """
    rows = []
    for (clf, fold), part in predictions.groupby(["classifier", "fold"], sort=True):
        m = binary_metrics(
            part["label"], part["pred"], part["score"], positive_label=positive_label
        )
        rows.append({"classifier": clf, "fold": str(fold), **m})
    per_fold = pd.DataFrame(rows, columns=["classifier", "fold", *METRICS, *COUNTS])
    summary = []
    for clf, part in per_fold.groupby("classifier", sort=True):
        summary.append({"classifier": clf, "fold": "mean", **part[METRICS].mean().to_dict()})
        summary.append({"classifier": clf, "fold": "std", **part[METRICS].std(ddof=1).to_dict()})
    return pd.concat([per_fold, pd.DataFrame(summary)], ignore_index=True)


# ----------------------------------------------------------------- bootstrap


def bootstrap_metrics(
    labels: pd.Series | np.ndarray,
    preds: pd.Series | np.ndarray,
    scores: pd.Series | np.ndarray,
    groups: pd.Series | np.ndarray,
    *,
    positive_label: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    block: int = 200,
) -> pd.DataFrame:
    """Point estimates of :data:`METRICS` with percentile bootstrap intervals over groups.

    Each bootstrap sample draws ``n_groups`` groups with replacement and keeps
    all rows of every drawn group (a cluster bootstrap): rows of one patient
    move together, so the interval reflects how many independent patients
    there are, not how many ROIs. The resampling is vectorised: per-group
    confusion counts, squared errors and per-score positive/negative counts
    are multiplied by a ``(block, n_groups)`` matrix of draw counts.

    Parameters
    ----------
    labels, preds : array-like of str
        Truth and call per row (ROI or image).
    scores : array-like of float
        Probability of ``positive_label`` per row.
    groups : array-like
        The resampling unit per row (patient group).
    positive_label : str
        The positive class.
    n_boot : int
        Bootstrap samples (>= 1).
    seed : int
        Seed of the draws; the same seed gives the same interval.
    level : float
        Coverage of the interval, in (0, 1).
    block : int
        Samples computed at once (memory: ``block * n_unique_scores`` floats).

    Returns
    -------
    pandas.DataFrame
        ``metric, estimate, ci_low, ci_high``, one row per :data:`METRICS`.
        Samples in which a metric is undefined (no positive drawn...) are
        left out of its interval; NaN when none defines it.
    """
    if n_boot < 1:
        raise ValueError(f"bootstrap_metrics: n_boot must be >= 1; got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_metrics: level must be in (0, 1); got {level}")
    labels, preds, scores = np.asarray(labels), np.asarray(preds), np.asarray(scores, float)
    point = binary_metrics(labels, preds, scores, positive_label=positive_label)
    g, _ = pd.factorize(np.asarray(groups))
    n_groups = int(g.max()) + 1 if len(g) else 0
    if n_groups == 0:
        return pd.DataFrame(
            {
                "metric": METRICS,
                "estimate": [point[m] for m in METRICS],
                "ci_low": np.nan,
                "ci_high": np.nan,
            }
        )
    y = labels == positive_label
    p = preds == positive_label

    def per_group(x: np.ndarray) -> np.ndarray:
        return np.bincount(g, weights=x.astype(float), minlength=n_groups)

    counts = np.stack(
        [
            per_group(~y & ~p),
            per_group(~y & p),
            per_group(y & ~p),
            per_group(y & p),
            per_group(np.ones_like(y)),
            per_group((scores - y) ** 2),
        ]
    )
    # Positives and negatives per (group, distinct score), scores ascending.
    _, u = np.unique(scores, return_inverse=True)
    n_u = int(u.max()) + 1
    pos = csr_matrix((np.ones(y.sum()), (g[y], u[y])), shape=(n_groups, n_u))
    neg = csr_matrix((np.ones((~y).sum()), (g[~y], u[~y])), shape=(n_groups, n_u))
    rng = np.random.default_rng(seed)
    samples = []
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        draws = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=size)
        w = draws.astype(float)
        samples.append(_weighted_metrics(w @ counts.T, (pos.T @ w.T).T, (neg.T @ w.T).T))
    values = np.concatenate(samples)  # (n_boot, len(METRICS))
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN metric: NaN interval
        low, high = np.nanpercentile(values, [tail, 100 - tail], axis=0)
    return pd.DataFrame(
        {
            "metric": METRICS,
            "estimate": [point[m] for m in METRICS],
            "ci_low": low,
            "ci_high": high,
        }
    )


def _weighted_metrics(counts: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """:data:`METRICS` per bootstrap sample from weighted counts.

    ``counts``: ``(b, 6)`` tn, fp, fn, tp, n, squared-error sums; ``pos``,
    ``neg``: ``(b, n_scores)`` positives and negatives at each distinct score,
    scores ascending. Returns ``(b, len(METRICS))``.
    """
    tn, fp, fn, tp, n, sq = counts.T
    with np.errstate(divide="ignore", invalid="ignore"):
        sensitivity, specificity = tp / (tp + fn), tn / (tn + fp)
        balanced = np.where(
            np.isnan(sensitivity),
            specificity,
            np.where(np.isnan(specificity), sensitivity, (sensitivity + specificity) / 2),
        )
        n_pos, n_neg = pos.sum(1), neg.sum(1)
        below = np.cumsum(neg, axis=1) - neg  # negatives scored lower; ties count half
        auc = (pos * (below + neg / 2)).sum(1) / (n_pos * n_neg)
        # average precision: precision at each distinct score, from the top down
        hits, false = np.cumsum(pos[:, ::-1], axis=1), np.cumsum(neg[:, ::-1], axis=1)
        precision_at = np.divide(
            hits, hits + false, out=np.zeros_like(hits), where=hits + false > 0
        )
        ap = (pos[:, ::-1] * precision_at).sum(1) / n_pos
        both = (n_pos > 0) & (n_neg > 0)
        columns = {
            "accuracy": (tp + tn) / n,
            "precision": tp / (tp + fp),
            "sensitivity": sensitivity,
            "specificity": specificity,
            "f1": 2 * tp / (2 * tp + fp + fn),
            "roc_auc": np.where(both, auc, np.nan),
            "balanced_accuracy": balanced,
            "pr_auc": np.where(both, ap, np.nan),
            "brier": sq / n,
        }
    return np.column_stack([columns[m] for m in METRICS])


def score_pooled(
    predictions: pd.DataFrame,
    groups: pd.Series,
    *,
    positive_label: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Rows ``fold == "pooled"``: metrics of all out-of-fold predictions, with bootstrap CIs.

    Parameters
    ----------
    predictions : pandas.DataFrame
        ROI or image predictions (``classifier, image_id, label, pred, score``).
    groups : pandas.Series
        Image id -> resampling group (patient group from folds.csv).
    positive_label, n_boot, seed, level
        See :func:`bootstrap_metrics`.

    Returns
    -------
    pandas.DataFrame
        Per classifier, one row per metric: ``classifier, fold`` (``pooled``),
        the metric's point estimate in its own column (other metrics empty),
        :data:`COUNTS` of the pooled predictions, ``metric, ci_low, ci_high``.
    """
    rows = []
    for clf, part in predictions.groupby("classifier", sort=True):
        group = part["image_id"].map(groups)
        if group.isna().any():
            raise ValueError(
                f"score_pooled: image {part.loc[group.isna(), 'image_id'].iloc[0]!r} has no group"
            )
        counts = binary_metrics(
            part["label"], part["pred"], part["score"], positive_label=positive_label
        )
        ci = bootstrap_metrics(
            part["label"],
            part["pred"],
            part["score"],
            group,
            positive_label=positive_label,
            n_boot=n_boot,
            seed=seed,
            level=level,
        )
        for row in ci.itertuples():
            rows.append(
                {
                    "classifier": clf,
                    "fold": "pooled",
                    row.metric: row.estimate,
                    **{c: counts[c] for c in COUNTS},
                    "metric": row.metric,
                    "ci_low": row.ci_low,
                    "ci_high": row.ci_high,
                }
            )
    return pd.DataFrame(rows, columns=["classifier", "fold", *METRICS, *COUNTS, *CI_COLUMNS])


# ------------------------------------------------------------ per-class metrics


def per_class_metrics(
    labels: pd.Series | np.ndarray,
    preds: pd.Series | np.ndarray,
    classes: list[str] | None = None,
) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, with macro and weighted averages.

    Parameters
    ----------
    labels, preds : array-like of str
        Truth and multi-class call per row. A call that is no class (e.g.
        :data:`NO_ROI`) is wrong for every class.
    classes : list of str, optional
        The classes to report (default: the labels present), in this order.

    Returns
    -------
    pandas.DataFrame
        ``class, precision, recall, f1, support``: one row per class, then
        ``macro`` (unweighted mean over classes) and ``weighted`` (mean
        weighted by support). A ratio with a zero denominator is NaN and is
        left out of the averages (a class with no test member in a fold).
    """
    labels, preds = np.asarray(labels).astype(str), np.asarray(preds).astype(str)
    classes = sorted(set(labels)) if classes is None else list(classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined ratios are NaN by design
        prec, rec, f1, support = precision_recall_fscore_support(
            labels, preds, labels=classes, zero_division=np.nan
        )
        rows = [
            {
                "class": c,
                "precision": prec[i],
                "recall": rec[i],
                "f1": f1[i],
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        ]
        for average in ("macro", "weighted"):
            a_prec, a_rec, a_f1, _ = precision_recall_fscore_support(
                labels, preds, labels=classes, average=average, zero_division=np.nan
            )
            rows.append(
                {
                    "class": average,
                    "precision": a_prec,
                    "recall": a_rec,
                    "f1": a_f1,
                    "support": int(support.sum()),
                }
            )
    return pd.DataFrame(rows, columns=["class", "precision", "recall", "f1", "support"])


def score_folds_per_class(
    predictions: pd.DataFrame, *, pred: str = "pred", classes: list[str] | None = None
) -> pd.DataFrame:
    """:func:`per_class_metrics` per classifier and fold, and on the pooled predictions.

    Parameters
    ----------
    predictions : pandas.DataFrame
        ``classifier, fold, label`` and the call column ``pred``.
    pred : str
        ``pred`` for ROI predictions, ``pred_class`` for image predictions.
    classes : list of str, optional
        Classes to report in every fold (default: all labels in ``predictions``).

    Returns
    -------
    pandas.DataFrame
        ``classifier, fold`` (an int as text, or ``pooled``), ``class,
        precision, recall, f1, support``.
    """
    classes = sorted(predictions["label"].astype(str).unique()) if classes is None else classes
    parts = []
    for clf, by_clf in predictions.groupby("classifier", sort=True):
        for fold, part in by_clf.groupby("fold", sort=True):
            table = per_class_metrics(part["label"], part[pred], classes)
            parts.append(table.assign(classifier=clf, fold=str(fold)))
        table = per_class_metrics(by_clf["label"], by_clf[pred], classes)
        parts.append(table.assign(classifier=clf, fold="pooled"))
    cols = ["classifier", "fold", "class", "precision", "recall", "f1", "support"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


# --------------------------------------------------------------- one dataset


@dataclass
class Evaluation:
    """Everything :func:`evaluate_embeddings` produces for one dataset and encoder."""

    roi_predictions: pd.DataFrame
    image_predictions: pd.DataFrame
    metrics: pd.DataFrame
    metrics_per_class: pd.DataFrame
    models: dict[tuple[str, int], Pipeline] = field(default_factory=dict)


def evaluate_embeddings(
    embeddings: Mapping[int, np.ndarray],
    rois: pd.DataFrame,
    folds: pd.DataFrame,
    *,
    classifiers: Mapping[str, Mapping],
    positive_label: str,
    image_aggregation: str = "vote",
    any_positive_threshold: float = 0.5,
    n_boot: int = 1000,
    bootstrap_seed: int = 0,
    ci_level: float = 0.95,
    inner_folds: int = 3,
) -> Evaluation:
    """Fit, predict and score every classifier on one dataset's fold embeddings.

    Checks the folds for leakage before any fit (a grouped split with a
    patient or group on both sides raises :class:`leukflow.evaluate.folds.LeakageError`).

    Parameters
    ----------
    embeddings : mapping of int to numpy.ndarray
        See :func:`fit_predict_folds`.
    rois : pandas.DataFrame
        ``roi_id, image_id, label, fold`` (see :func:`leukflow.evaluate.folds.label_rois`).
    folds : pandas.DataFrame
        The dataset's rows of folds.csv: ``image_id, patient, group, label,
        fold, leaky``.
    classifiers, positive_label
        See :func:`fit_predict_folds`.
    image_aggregation, any_positive_threshold
        ``method`` and ``threshold`` of :func:`aggregate_images`.
    n_boot, bootstrap_seed, ci_level
        See :func:`bootstrap_metrics`.
    inner_folds : int
        Inner grouped folds that tune a classifier's ``grid`` (training part only).

    Returns
    -------
    Evaluation
        Predictions and metric tables, each with a ``leaky`` column (True when
        the folds came from the random protocol), and the fitted models.
        ``metrics`` has ``classifier, level, fold`` (per fold, ``mean``,
        ``std``, ``pooled``), :data:`METRICS`, :data:`COUNTS`,
        :data:`CI_COLUMNS`; ``metrics_per_class`` has ``classifier, level,
        fold, class, precision, recall, f1, support``.
    """
    check_no_leakage(folds, "patient")
    check_no_leakage(folds, "group")
    if "group" not in rois:
        rois = rois.merge(folds[["image_id", "group"]], on="image_id", how="left")
    roi_preds, models = fit_predict_folds(
        embeddings,
        rois,
        classifiers=classifiers,
        positive_label=positive_label,
        return_models=True,
        inner_folds=inner_folds,
    )
    out = score_predictions(
        roi_preds,
        folds,
        positive_label=positive_label,
        image_aggregation=image_aggregation,
        any_positive_threshold=any_positive_threshold,
        n_boot=n_boot,
        bootstrap_seed=bootstrap_seed,
        ci_level=ci_level,
    )
    out.models = models
    return out


def score_predictions(
    roi_preds: pd.DataFrame,
    folds: pd.DataFrame,
    *,
    positive_label: str,
    image_aggregation: str = "vote",
    any_positive_threshold: float = 0.5,
    n_boot: int = 1000,
    bootstrap_seed: int = 0,
    ci_level: float = 0.95,
) -> Evaluation:
    """Image calls and every metric table from ROI predictions of any source.

    ``roi_preds`` may come from fitted classifiers (:func:`fit_predict_folds`),
    the encoder's head (:func:`head_predictions`) or a vote
    (:func:`vote_predictions`). Only test images (fold >= 0) are scored; a
    holdout split's training-only images (fold -1) are not. Parameters and
    the returned tables: see :func:`evaluate_embeddings` (no models).
    """
    leaky = bool(folds["leaky"].any())
    folds = folds[folds["fold"] >= 0]
    image_preds = aggregate_images(
        roi_preds,
        folds,
        positive_label=positive_label,
        method=image_aggregation,
        threshold=any_positive_threshold,
    )
    groups = folds.set_index("image_id")["group"]
    classes = sorted(folds["label"].astype(str).unique())
    metrics, per_class = [], []
    for level, preds, call in (("roi", roi_preds, "pred"), ("image", image_preds, "pred_class")):
        metrics.append(score_folds(preds, positive_label=positive_label).assign(level=level))
        metrics.append(
            score_pooled(
                preds,
                groups,
                positive_label=positive_label,
                n_boot=n_boot,
                seed=bootstrap_seed,
                level=ci_level,
            ).assign(level=level)
        )
        per_class.append(
            score_folds_per_class(preds, pred=call, classes=classes).assign(level=level)
        )
    first = ["classifier", "level", "fold", "leaky"]
    table = pd.concat(metrics, ignore_index=True).assign(leaky=leaky)
    table = table[[*first, *METRICS, *COUNTS, *CI_COLUMNS]]
    per_class_table = pd.concat(per_class, ignore_index=True).assign(leaky=leaky)
    per_class_table = per_class_table[[*first, "class", "precision", "recall", "f1", "support"]]
    return Evaluation(
        roi_predictions=roi_preds.assign(leaky=leaky),
        image_predictions=image_preds.assign(leaky=leaky),
        metrics=table,
        metrics_per_class=per_class_table,
    )
