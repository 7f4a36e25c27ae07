"""Classical classifiers on fold embeddings, and the encoder head's and ensembles' calls.

Fold ``f``'s classifier is fitted on the training ROIs of fold ``f`` embedded
by fold ``f``'s encoder (trained on those same ROIs), and scored on that
fold's test ROIs; nothing it sees comes from the test patients. Every source
of ROI predictions here (fitted classifiers, the encoder's own head, a vote
of several models) returns them in the same columns.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from leukflow.plan import CNN_SOFTMAX

log = logging.getLogger(__name__)

CLASSIFIERS = ("random_forest", "knn", "svm_rbf", "svm_linear", "logistic_regression")
VOTES = ("soft", "majority")
#: Inner folds of the Platt scaling of the SVMs (inside each training part).
CALIBRATION_FOLDS = 5
#: Per-class probability columns of the ROI predictions: ``proba_<label>``.
PROBA_PREFIX = "proba_"


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


def _fit_to_size(pipe: Pipeline, shape: tuple[int, int], where: str) -> None:
    """Lower PCA's components and knn's neighbours to what a small training part holds.

    A tiny training part (a small dataset's fold, or an inner calibration part
    of one) would otherwise make scikit-learn refuse the fit; each change is
    logged.
    """
    most = min(shape)
    if "pca" in pipe.named_steps and pipe.named_steps["pca"].n_components > most:
        log.warning("%s: pca_components lowered to %d (training part is %s)", where, most, shape)
        pipe.set_params(pca__n_components=most)
    model = pipe.named_steps["model"]
    if isinstance(model, KNeighborsClassifier) and model.n_neighbors > shape[0]:
        log.warning(
            "%s: n_neighbors lowered to %d (training part has %d ROIs)", where, shape[0], shape[0]
        )
        pipe.set_params(model__n_neighbors=shape[0])


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
    _fit_to_size(pipe, x.shape, where)
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
            if test.any():
                out.append(
                    _test_rows(rois, test, name, fold, clf.predict(emb[test]),
                               clf.predict_proba(emb[test]), [str(c) for c in clf.classes_],
                               labels, positive_label)
                )  # fmt: skip
    preds = _concat_rows(out, labels)
    return (preds, models) if return_models else preds


def _test_rows(
    rois: pd.DataFrame,
    test: np.ndarray,
    name: str,
    fold: int,
    pred: np.ndarray,
    proba: np.ndarray,
    classes: list[str],
    labels: list[str],
    positive_label: str,
) -> pd.DataFrame:
    """ROI prediction rows of one model's test ROIs.

    ``proba``'s columns (``classes``) are spread onto one ``proba_<label>``
    column per label of ``labels`` (0 for a label the model does not know).
    """
    full = np.zeros((int(test.sum()), len(labels)))
    for j, c in enumerate(classes):
        if c in labels:
            full[:, labels.index(c)] = proba[:, j]
    score = proba[:, classes.index(positive_label)] if positive_label in classes else 0.0
    return (
        rois.loc[test, ["roi_id", "image_id", "label"]]
        .assign(classifier=name, fold=fold, pred=pred, score=score)
        .reset_index(drop=True)
        .join(pd.DataFrame(full, columns=[PROBA_PREFIX + label for label in labels]))
    )


def _concat_rows(parts: list[pd.DataFrame], labels: list[str]) -> pd.DataFrame:
    """Stack ROI prediction rows in the columns of :func:`fit_predict_folds`."""
    proba_cols = [PROBA_PREFIX + label for label in labels]
    cols = ["classifier", "fold", "roi_id", "image_id", "label", "pred", "score", *proba_cols]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


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
    out = []
    for fold, p in sorted(probs.items()):
        p = np.asarray(p, dtype=float)
        if p.shape != (len(rois), len(classes)):
            raise ValueError(
                f"head_predictions: fold {fold} has probabilities of shape {p.shape}; "
                f"expected ({len(rois)}, {len(classes)}) for the ROIs and classes {classes}"
            )
        test = (rois["fold"] == fold).to_numpy()
        if test.any():
            pred = np.asarray(classes)[p[test].argmax(1)]
            out.append(
                _test_rows(rois, test, name, fold, pred, p[test], classes, labels, positive_label)
            )
    return _concat_rows(out, labels)


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
