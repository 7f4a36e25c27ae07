"""Model files: fitted pipelines written as skops archives, read back trusting only known types."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import skops.io
from sklearn.pipeline import Pipeline

from leukflow.data.io import InvalidInputError, atomic_path


def save_model(model: Pipeline, path: str | Path) -> None:
    """Write a fitted pipeline in the skops format (no pickle), atomically.

    What it writes must load with :func:`load_model`: a classifier made of
    another type needs that type added to :data:`TRUSTED_MODEL_TYPES`.
    """
    with atomic_path(path) as tmp:
        skops.io.dump(model, tmp)


#: Every type a model file written by :func:`save_model` is made of: the
#: pipelines :func:`.make_classifier` builds, fitted, and the containers and
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
