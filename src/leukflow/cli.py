"""The ``leukflow`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from leukflow import __version__


def _demo_data(args: argparse.Namespace) -> int:
    from leukflow.core.runlog import start_log
    from leukflow.data.demo import draw_demo_dataset

    log = start_log("demo_data", params=vars(args) | {"func": None})
    labels = draw_demo_dataset(
        args.out, n_fields=args.n, seed=args.seed, fields_per_patient=args.fields_per_patient
    )
    log.info(
        "wrote %d fields of %d patients to %s (labels.csv, cells.csv, images/)",
        len(labels), labels["patient"].nunique(), args.out,
    )  # fmt: skip
    return 0


def _metrics(args: argparse.Namespace) -> int:
    import pandas as pd

    path = f"{args.results_dir}/metrics.csv"
    from leukflow.evaluate.reliance import without_reliance

    metrics = without_reliance(pd.read_csv(path, dtype={"fold": str}))
    keys = ["dataset", "encoder", "classifier", "level"]
    cols = ["accuracy", "sensitivity", "specificity", "f1", "roc_auc"]
    mean = metrics[metrics["fold"] == "mean"].set_index(keys)[cols]
    std = metrics[metrics["fold"] == "std"].set_index(keys)[cols]
    table = mean.map("{:.3f}".format) + " ± " + std.map("{:.3f}".format)
    pooled = metrics[(metrics["fold"] == "pooled") & metrics["metric"].isin(cols)]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"{path}: mean ± std over folds\n{table.to_string()}")  # noqa: T201
        if len(pooled):
            value = pooled.apply(lambda r: r[r["metric"]], axis=1)
            ci = (
                value.map("{:.3f}".format)
                + " ["
                + pooled["ci_low"].map("{:.3f}".format)
                + ", "
                + pooled["ci_high"].map("{:.3f}".format)
                + "]"
            )
            wide = pooled.assign(ci=ci).pivot(index=keys, columns="metric", values="ci")
            print(f"\npooled out-of-fold predictions [bootstrap CI, patient groups resampled]\n"  # noqa: T201
                  f"{wide[[c for c in cols if c in wide]].to_string()}")  # fmt: skip
    return 0


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="RESULTS_DIR", help="results_dir of a finished run"
    )
    for kind in ("dataset", "encoder", "classifier"):
        parser.add_argument(
            f"--{kind}",
            help=f"which of the run's {kind}s (default: the first in the run's config; "
            "an ensemble is --encoder ensemble --classifier <name>)",
        )
    parser.add_argument(
        "--device", help="torch device for the encoders (default: cuda when present, else cpu)"
    )


def _load_predictor(args: argparse.Namespace):
    from leukflow.deploy.predict import load_predictor

    predictor = load_predictor(
        args.model,
        dataset=args.dataset,
        encoder=args.encoder,
        classifier=args.classifier,
        device=args.device,
    )
    for note in predictor.notes:
        print(f"leukflow {args.command}: note: {note}", file=sys.stderr)  # noqa: T201
    return predictor


def _predict(args: argparse.Namespace) -> int:
    import logging

    from leukflow.deploy.predict import image_table_path, predict_paths, review_table_path

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    predictor = _load_predictor(args)
    images = predict_paths(
        predictor, args.images, out=args.out, overlay_dir=args.overlays, chunk_size=args.chunk_size
    )
    ok = images["status"] == "ok"
    calls = images.loc[ok, "label"].value_counts().to_dict()
    reasons = images.loc[images["reason"] != "", "reason"].value_counts().to_dict()
    models = (
        f"{predictor.vote} vote of {len(predictor.members)} models"
        if predictor.vote
        else f"{len(predictor.folds)} folds averaged"
    )
    review = int((images["review"] == True).sum())  # noqa: E712 (True, False or "")
    print(  # noqa: T201
        f"{len(images)} images ({predictor.dataset} / {predictor.encoder} / "
        f"{predictor.classifier}, {models}, {predictor.device}): "
        f"calls {calls}; without ROIs or unreadable {reasons or 'none'}; "
        f"{review} to review\n"
        f"ROIs: {args.out}\nimages: {image_table_path(args.out)}\n"
        f"cells to review: {review_table_path(args.out)}"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    from leukflow.deploy.serve import create_app, serve

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(
        _load_predictor(args), max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
        max_decoding=args.max_decoding,
    )  # fmt: skip
    serve(app, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``leukflow`` command."""
    parser = argparse.ArgumentParser(
        prog="leukflow",
        description="Detect acute lymphoblastic leukemia in blood-smear images. "
        "The pipeline itself runs with `snakemake`; see README.md.",
    )
    parser.add_argument("--version", action="version", version=f"leukflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo-data", help="draw the synthetic demo dataset")
    demo.add_argument("out", help="output folder (created)")
    demo.add_argument("--n", type=int, default=60, help="number of fields (default 60)")
    demo.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    demo.add_argument(
        "--fields-per-patient", type=int, default=3, help="fields per patient (default 3)"
    )
    demo.set_defaults(func=_demo_data)
    show = sub.add_parser("metrics", help="print the mean ± std metrics of a finished run")
    show.add_argument("results_dir", help="the run's results_dir")
    show.set_defaults(func=_metrics)
    predict = sub.add_parser(
        "predict",
        help="apply a finished run's segmentation, encoders and classifier to new images",
        description="Per-ROI probabilities (the mean of the fold models') to OUT, one call "
        "per image to OUT's <stem>_images.csv, and an overlay PNG per image.",
    )
    _model_args(predict)
    predict.add_argument("--out", required=True, help="per-ROI CSV to write (e.g. preds.csv)")
    predict.add_argument(
        "--overlays", help="folder for the overlay PNGs (default: <out stem>_overlays)"
    )
    predict.add_argument(
        "--chunk-size", type=int, help="images per encoder batch (default: the run's)"
    )
    predict.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    predict.set_defaults(func=_predict)
    review = sub.add_parser(
        "serve",
        help="a local web page: upload an image, see its cells outlined and called",
        description="Upload a smear field or a cell image; see the segmented cells with "
        "their class and probability, the image-level call, and download the CSV.",
    )
    _model_args(review)
    review.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    review.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    review.add_argument(
        "--max-upload-mb", type=float, default=20, help="largest upload in MB (default 20)"
    )
    review.add_argument(
        "--max-pixels", type=int, default=40_000_000,
        help="largest image in pixels (default 40,000,000)",
    )  # fmt: skip
    review.add_argument(
        "--max-decoding", type=int, default=2,
        help="uploads decoded at once; others wait a few seconds, then get 503 (default 2)",
    )  # fmt: skip
    review.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leukflow`` console command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        print(f"leukflow {args.command}: error: {err}", file=sys.stderr)  # noqa: T201
        return 2


if __name__ == "__main__":
    sys.exit(main())
