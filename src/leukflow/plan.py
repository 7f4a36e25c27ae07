"""The run plan: which datasets, folds, encoders and heads a run has, and where each output lies.

One validated config (:func:`leukflow.core.config.validate_config`) decides
everything a run makes; :class:`RunPlan` works it out once, in plain Python:

- the **datasets**: the configured ones, their **twins** under the other fold
  protocol (``folds.twin``, named ``<dataset>_<protocol>``) and the **shortcut
  controls** (``evaluation.shortcut_controls``: ``<dataset>_cell_only`` and
  ``<dataset>_background_only``, made from the dataset's crops);
- the **folds**: ``0..k-1``, or fold 0 alone for a holdout split
  (``folds.holdout_fraction`` > 0);
- the **encoders** and which of them train once for every fold
  (``all_labels``, ``frozen``: ``all.pt``) or once per fold (``fold_<k>.pt``);
- the **heads** that score each dataset: fitted classifiers on every encoder,
  ``cnn_softmax`` on encoders with a trained head (not frozen, not HOG), and
  the ensembles' votes over ``<encoder>/<classifier>`` members;
- the **cross-dataset pairs**;
- the **path of every output** under ``results_dir``.

The Snakemake rules ask it for their wildcards and paths, and ``leukflow
predict`` and ``serve`` ask it which model files a finished run holds. Path
methods return strings; an argument left out stays a ``{wildcard}``, so one
method gives both a rule's pattern and the concrete files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The classifier name of an encoder's own softmax head (its softmax, read from the
#: embedding store): a classifier that is not fitted.
CNN_SOFTMAX = "cnn_softmax"
#: The ``encoder`` of an ensemble's rows in metrics.csv and of its files.
ENSEMBLE = "ensemble"
#: Plots made per dataset and model: ``plots/<dataset>/<encoder>/<classifier>_<kind>.png``.
PLOT_KINDS = ("confusion", "roc", "calibration", "wbc_count", "risk_coverage")
#: Formats whose images are single cells: ``shortcut_controls: auto`` adds controls for them.
SINGLE_CELL_FORMATS = ("allidb2", "cnmc", "zheng")
CONTROL_KINDS = ("cell_only", "background_only")
#: Encoder trainings whose one checkpoint (``all.pt``) serves every fold.
SHARED_TRAININGS = ("all_labels", "frozen")
_OTHER_PROTOCOL = {"grouped": "random", "random": "grouped"}


@dataclass(frozen=True)
class ModelFiles:
    """The files one fold of one model needs to predict.

    Attributes
    ----------
    member : str
        ``<encoder>/<classifier>`` (an ensemble's member, or the model itself).
    fold : int
        The fold whose training part fitted it.
    part : str
        The checkpoint's stem: ``fold_<k>`` or ``all``.
    checkpoint : str
        The encoder checkpoint.
    classifier : str or None
        The fitted classifier's ``.skops`` file; None for ``cnn_softmax``
        (the checkpoint's own head).
    store : str
        The embedding store the run made with that checkpoint.
    """

    member: str
    fold: int
    part: str
    checkpoint: str
    classifier: str | None
    store: str


def _applies(option: bool | str, fmt: str) -> bool:
    """Whether an ``auto | true | false`` evaluation option covers a dataset of format ``fmt``."""
    return option is True or (option == "auto" and fmt in SINGLE_CELL_FORMATS)


@dataclass(frozen=True)
class RunPlan:
    """What a run makes, worked out from its validated config (see the module docstring).

    Build it with :meth:`from_config`; every attribute is derived from the config.
    """

    results_dir: str
    datasets: dict[str, dict[str, Any]]
    protocols: dict[str, str]
    twins: dict[str, str]
    controls: dict[str, tuple[str, str]]
    folds: tuple[int, ...]
    encoders: dict[str, dict[str, Any]]
    classifiers: dict[str, dict[str, Any]]
    ensembles: dict[str, dict[str, Any]]
    cross_pairs: tuple[tuple[str, str], ...]
    qa_methods: tuple[str, ...]
    #: Configured datasets whose models get the background reliance test.
    reliance: tuple[str, ...] = ()

    # ------------------------------------------------------------ building

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, results_dir: str | None = None) -> RunPlan:
        """Work out the plan of a validated config.

        Parameters
        ----------
        config : mapping
            A config as :func:`leukflow.core.config.validate_config` returns it
            (every key present), e.g. the ``config`` of a run's provenance.json.
        results_dir : str, optional
            Where the outputs lie, when not the config's ``results_dir`` (a
            results folder that was moved).

        Raises
        ------
        ValueError
            A twin or a shortcut control would take a configured dataset's
            name, or an ensemble member or cross-dataset pair names something
            the run does not make.
        """
        configured = dict(config["datasets"])
        protocol = config["folds"]["protocol"]
        protocols = dict.fromkeys(configured, protocol)
        twins: dict[str, str] = {}
        if config["folds"]["twin"]:
            other = _OTHER_PROTOCOL[protocol]
            twins = {f"{n}_{other}": n for n in configured}
            taken = set(twins) & set(configured)
            if taken:
                raise ValueError(
                    f"folds.twin: dataset names {sorted(taken)} are taken by the twins of "
                    f"{sorted(twins[t] for t in taken)}; rename them or set folds.twin: false"
                )
            protocols.update(dict.fromkeys(twins, other))
        datasets = {**configured, **{t: configured[n] for t, n in twins.items()}}
        controls_on = config["evaluation"]["shortcut_controls"]
        controls = {
            f"{name}_{kind}": (name, kind)
            for name, d in configured.items()
            if controls_on is True
            or (controls_on == "auto" and d["format"] in SINGLE_CELL_FORMATS)
            for kind in CONTROL_KINDS
        }
        if set(controls) & set(datasets):
            raise ValueError(
                "evaluation.shortcut_controls: dataset names "
                f"{sorted(set(controls) & set(datasets))} are taken by shortcut controls; "
                "rename them or set shortcut_controls: false"
            )
        folds = config["folds"]
        segmentation = config["segmentation"]
        reliance_on = config["evaluation"]["reliance_test"]
        plan = cls(
            results_dir=str(config["results_dir"] if results_dir is None else results_dir),
            datasets=datasets,
            protocols=protocols,
            twins=twins,
            controls=controls,
            folds=(0,) if folds["holdout_fraction"] else tuple(range(folds["k"])),
            encoders=dict(config["encoders"]),
            classifiers=dict(config["classifiers"]),
            ensembles=dict(config["evaluation"]["ensembles"]),
            cross_pairs=tuple(
                (p["train"], p["test"]) for p in config["evaluation"]["cross_dataset"]
            ),
            # the run's method first, then the further methods QA scores
            qa_methods=tuple(dict.fromkeys([segmentation["method"], *config["qa"]["methods"]])),
            reliance=tuple(n for n, d in configured.items() if _applies(reliance_on, d["format"])),
        )
        plan._check()
        return plan

    def _check(self) -> None:
        for name, ensemble in self.ensembles.items():
            for member in ensemble["members"]:
                self._check_member(name, member)
        for index, (train, test) in enumerate(self.cross_pairs):
            for side, name in (("train", train), ("test", test)):
                if name not in self.datasets:
                    raise ValueError(
                        f"evaluation.cross_dataset[{index}].{side}: unknown dataset {name!r}; "
                        f"expected one of {sorted(self.datasets)}"
                    )
            if train == test:
                raise ValueError(
                    f"evaluation.cross_dataset[{index}]: train and test are both {train!r}; "
                    f"within-dataset figures are in metrics.csv"
                )
        if self.cross_pairs and not self.fitted:
            raise ValueError(
                "evaluation.cross_dataset: needs a fitted classifier under classifiers "
                "besides cnn_softmax, which is not scored across datasets"
            )

    def _check_member(self, ensemble: str, member: str) -> None:
        encoder, classifier = member.split("/")
        if encoder not in self.encoders:
            raise ValueError(
                f"evaluation.ensembles.{ensemble}: member {member!r} names encoder "
                f"{encoder!r}; expected one of {sorted(self.encoders)}"
            )
        if classifier == CNN_SOFTMAX and encoder not in self.softmax_encoders:
            raise ValueError(
                f"evaluation.ensembles.{ensemble}: member {member!r} needs classifiers."
                f"cnn_softmax and an encoder with a trained head (not frozen, not hog)"
            )
        if classifier != CNN_SOFTMAX and classifier not in self.fitted:
            raise ValueError(
                f"evaluation.ensembles.{ensemble}: member {member!r} names classifier "
                f"{classifier!r}; expected one of {sorted([*self.fitted, CNN_SOFTMAX])} (listed "
                f"under classifiers)"
            )

    # ------------------------------------------------------------ what runs

    @property
    def configured(self) -> list[str]:
        """The datasets the config lists (no twins, no controls)."""
        return [n for n in self.datasets if n not in self.twins]

    @property
    def eval_datasets(self) -> list[str]:
        """Every dataset that encoders and classifiers run on: datasets, twins, controls."""
        return [*self.datasets, *self.controls]

    @property
    def demo_datasets(self) -> dict[str, dict[str, Any]]:
        """Configured datasets of format ``demo``, whose folder a rule draws."""
        return {
            n: d for n, d in self.datasets.items() if n not in self.twins and d["format"] == "demo"
        }

    @property
    def fitted(self) -> dict[str, dict[str, Any]]:
        """Classifiers fitted on the embeddings (every configured one but cnn_softmax)."""
        return {n: p for n, p in self.classifiers.items() if n != CNN_SOFTMAX}

    @property
    def heads(self) -> list[str]:
        """Encoders with a trained head, whose softmax the store keeps under ``probs/``."""
        return [e for e, enc in self.encoders.items()
                if enc["training"] != "frozen" and enc["arch"] != "hog"]  # fmt: skip

    @property
    def softmax_encoders(self) -> list[str]:
        """Encoders whose head is scored as classifier cnn_softmax (none unless configured)."""
        return self.heads if CNN_SOFTMAX in self.classifiers else []

    def is_shared(self, encoder: str) -> bool:
        """Whether one checkpoint (``all.pt``) serves every fold of ``encoder``."""
        return self.encoders[encoder]["training"] in SHARED_TRAININGS

    def parts(self, encoder: str) -> list[str]:
        """Checkpoint stems an embedding of ``encoder`` needs: ``all`` or ``fold_<k>`` each."""
        return ["all"] if self.is_shared(encoder) else [f"fold_{k}" for k in self.folds]

    def fold_part(self, encoder: str, fold: int) -> str:
        """Return the checkpoint stem that fold ``fold`` of ``encoder`` uses."""
        return "all" if self.is_shared(encoder) else f"fold_{fold}"

    def classifiers_for(self, encoder: str) -> list[str]:
        """Heads that score ``encoder``, in config order (cnn_softmax only with a trained head)."""
        return [
            c for c in self.classifiers if c != CNN_SOFTMAX or encoder in self.softmax_encoders
        ]

    def members(self, encoder: str, classifier: str) -> list[str]:
        """Return the ``<encoder>/<classifier>`` models that one choice stands for.

        An ensemble (``encoder`` :data:`ENSEMBLE`, ``classifier`` its name) stands
        for its members; any other choice for itself.

        Raises
        ------
        ValueError
            The run has no such model.
        """
        if encoder == ENSEMBLE and encoder not in self.encoders:
            if classifier not in self.ensembles:
                raise ValueError(
                    f"no ensemble {classifier!r} in the run; expected one of "
                    f"{sorted(self.ensembles)}"
                )
            return list(self.ensembles[classifier]["members"])
        if encoder not in self.encoders:
            raise ValueError(
                f"no encoder {encoder!r} in the run; expected one of {list(self.encoders)}"
            )
        if classifier not in self.classifiers_for(encoder):
            raise ValueError(
                f"classifier {classifier!r} does not score encoder {encoder!r}; expected one "
                f"of {self.classifiers_for(encoder)}"
            )
        return [f"{encoder}/{classifier}"]

    def model_files(self, dataset: str, encoder: str, classifier: str) -> list[ModelFiles]:
        """Every fold's files of one model (an ensemble: of each member), in fold order.

        Parameters
        ----------
        dataset : str
            A dataset of the run (configured or twin).
        encoder, classifier : str
            The model; an ensemble is ``(ENSEMBLE, <name>)``.

        Raises
        ------
        ValueError
            The run has no such dataset or model.
        """
        if dataset not in self.datasets:
            raise ValueError(
                f"no dataset {dataset!r} in the run; expected one of {list(self.datasets)}"
            )
        files = []
        for member in self.members(encoder, classifier):
            enc, clf = member.split("/")
            for fold in self.folds:
                part = self.fold_part(enc, fold)
                files.append(
                    ModelFiles(
                        member=member,
                        fold=fold,
                        part=part,
                        checkpoint=self.checkpoint(dataset, enc, part),
                        classifier=None
                        if clf == CNN_SOFTMAX
                        else self.model(dataset, enc, clf, fold),
                        store=self.embeddings(dataset, enc),
                    )
                )
        return files

    # ------------------------------------------------------------ paths

    def result(self, path: str) -> str:
        """``<results_dir>/<path>``."""
        return f"{self.results_dir}/{path}"

    def logfile(self, path: str) -> str:
        """``<results_dir>/logs/<path>``."""
        return self.result(f"logs/{path}")

    def benchfile(self, path: str) -> str:
        """``<results_dir>/benchmarks/<path>``."""
        return self.result(f"benchmarks/{path}")

    def segment_file(self, name: str, dataset: str = "{dataset}") -> str:
        """Return a dataset's merged segmentation file (``rois.parquet``, ``crops.zarr``...)."""
        return self.result(f"segment/{dataset}/{name}")

    def batch_file(
        self, name: str, dataset: str = "{dataset}", batch: str | int = "{batch}"
    ) -> str:
        """File ``name`` of one segmentation batch."""
        return self.result(f"segment/{dataset}/batch_{batch}/{name}")

    def ledger(self, dataset: str = "{dataset}") -> str:
        """Return a dataset's batch ledger: ``segment/<dataset>/batches.csv``."""
        return self.segment_file("batches.csv", dataset)

    def control_base(self, dataset: str) -> str:
        """Return the dataset whose crops a shortcut control is made from."""
        return self.controls[dataset][0]

    def checkpoint(
        self, dataset: str = "{dataset}", encoder: str = "{encoder}", part: str = "{part}"
    ) -> str:
        """Return an encoder checkpoint: ``train/<dataset>/<encoder>/<part>.pt``."""
        return self.result(f"train/{dataset}/{encoder}/{part}.pt")

    def checkpoints(self, dataset: str, encoder: str) -> list[str]:
        """Return the checkpoints an embedding of ``dataset`` by ``encoder`` reads."""
        return [self.checkpoint(dataset, encoder, part) for part in self.parts(encoder)]

    def embeddings(self, dataset: str = "{dataset}", encoder: str = "{encoder}") -> str:
        """Return the embedding store of a dataset by an encoder (zarr)."""
        return self.result(f"embeddings/{dataset}/{encoder}.zarr")

    def embedding_ids(self, dataset: str = "{dataset}", encoder: str = "{encoder}") -> str:
        """Return the ROI ids of that store's rows."""
        return self.result(f"embeddings/{dataset}/{encoder}_rois.parquet")

    def model(self, dataset: str = "{dataset}", encoder: str = "{encoder}",
              classifier: str = "{classifier}", fold: int | str = "{fold}") -> str:  # fmt: skip
        """Return a fitted classifier of one fold (``.skops``)."""
        return self.result(f"evaluate/{dataset}/{encoder}/models/{classifier}_fold_{fold}.skops")

    def fitted_file(
        self, name: str, dataset: str = "{dataset}", encoder: str = "{encoder}"
    ) -> str:
        """File ``name`` of the fitted classifiers on one encoder (one table for all)."""
        return self.result(f"evaluate/{dataset}/{encoder}/{name}")

    def head_file(self, name: str, dataset: str = "{dataset}", encoder: str = "{encoder}") -> str:
        """File ``name`` of an encoder's cnn_softmax head."""
        return self.result(f"evaluate/{dataset}/{encoder}/{CNN_SOFTMAX}/{name}")

    def ensemble_file(
        self, name: str, dataset: str = "{dataset}", ensemble: str = "{ensemble}"
    ) -> str:
        """File ``name`` of an ensemble's vote."""
        return self.result(f"evaluate/{dataset}/{ENSEMBLE}/{ensemble}/{name}")

    def member_predictions(self, member: str, dataset: str = "{dataset}") -> str:
        """ROI predictions of an ensemble member ``<encoder>/<classifier>``."""
        encoder, classifier = member.split("/")
        if classifier == CNN_SOFTMAX:
            return self.head_file("roi_predictions.parquet", dataset, encoder)
        return self.fitted_file("roi_predictions.parquet", dataset, encoder)

    def plot(self, kind: str = "{kind}", dataset: str = "{dataset}", encoder: str = "{encoder}",
             classifier: str = "{classifier}") -> str:  # fmt: skip
        """Return ``plots/<dataset>/<encoder>/<classifier>_<kind>.png``."""
        return self.result(f"plots/{dataset}/{encoder}/{classifier}_{kind}.png")

    def reliance_files(self) -> list[str]:
        """Reliance test tables: each reliance dataset x encoder that a classifier scores."""
        return [self.fitted_file("reliance_metrics.csv", d, e) for d in self.reliance
                for e in self.encoders if self.fitted or e in self.softmax_encoders]  # fmt: skip

    def evaluations(self, name: str) -> list[str]:
        """File ``name`` of every evaluation: fitted classifiers, heads, ensembles."""
        paths = [self.fitted_file(name, d, e) for d in self.eval_datasets
                 for e in (self.encoders if self.fitted else [])]  # fmt: skip
        paths += [
            self.head_file(name, d, e) for d in self.eval_datasets for e in self.softmax_encoders
        ]
        paths += [
            self.ensemble_file(name, d, n) for d in self.eval_datasets for n in self.ensembles
        ]
        return paths

    def evaluation_plots(self) -> list[str]:
        """Every plot of every evaluation."""
        plots = [self.plot(k, d, e, c) for d in self.eval_datasets for e in self.encoders
                 for c in self.fitted for k in PLOT_KINDS]  # fmt: skip
        plots += [self.plot(k, d, e, CNN_SOFTMAX) for d in self.eval_datasets
                  for e in self.softmax_encoders for k in PLOT_KINDS]  # fmt: skip
        plots += [self.plot(k, d, ENSEMBLE, n) for d in self.eval_datasets
                  for n in self.ensembles for k in PLOT_KINDS]  # fmt: skip
        return plots

    def cross_checkpoint(self, train: str, encoder: str) -> str:
        """Return the train dataset's encoder trained on every labelled ROI (all or whole.pt)."""
        return self.checkpoint(train, encoder, "all" if self.is_shared(encoder) else "whole")

    def cross_store(
        self, dataset: str = "{dataset}", train: str = "{train}", encoder: str = "{encoder}"
    ) -> str:
        """Embeddings of ``dataset`` by the encoder trained on the pair's train dataset."""
        return self.result(f"cross/embeddings/{train}/{encoder}/{dataset}.zarr")

    def cross_ids(
        self, dataset: str = "{dataset}", train: str = "{train}", encoder: str = "{encoder}"
    ) -> str:
        """Return the ROI ids of a cross store's rows."""
        return self.result(f"cross/embeddings/{train}/{encoder}/{dataset}_rois.parquet")

    def cross_file(self, name: str, train: str = "{train}", test: str = "{test}",
                   encoder: str = "{encoder}") -> str:  # fmt: skip
        """File ``name`` of a cross-dataset pair's scoring."""
        return self.result(f"cross/{train}/{test}/{encoder}/{name}")

    def cross_outputs(self) -> list[str]:
        """Return the cross-dataset table and heatmap, when the run has pairs."""
        if not self.cross_pairs:
            return []
        return [self.result("cross_dataset.csv"), self.result("cross_dataset.png")]

    def final_outputs(self) -> list[str]:
        """Return what ``rule all`` asks for: the user's tables, stores, plots."""
        return [
            *map(self.result, ["manifest.parquet", "provenance.json", "rejects.csv",
                               "rois.parquet", "folds.csv", "metrics.csv",
                               "metrics_per_class.csv", "comparison.csv", "comparison.png"]),
            *[self.result(f"qa/{d}/summary.csv") for d in self.datasets],
            *[self.embeddings(d, e) for d in self.eval_datasets for e in self.encoders],
            *self.evaluation_plots(),
            *self.cross_outputs(),
        ]  # fmt: skip
