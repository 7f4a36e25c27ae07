# Fit and score: classifiers per fold on the embeddings -> models, predictions,
# metrics (per fold, mean, std, pooled with bootstrap CIs; per class), plots;
# the encoders' own heads (cnn_softmax) and votes (ensembles) scored the same way;
# all in metrics.csv, and the leaky and honest figures beside the papers' in
# comparison.csv.

# Plots per dataset x encoder x classifier, plots/<dataset>/<encoder>/<classifier>_<kind>.png;
# fit_classifiers names one output list per kind.
PLOT_KINDS = ["confusion", "roc", "calibration", "wbc_count"]
CNN_SOFTMAX = "cnn_softmax"
FITTED = {name: p for name, p in CLASSIFIERS.items() if name != CNN_SOFTMAX}
# encoders with a trained head, whose softmax the store keeps under probs/
HEADS = [
    e
    for e, enc in ENCODERS.items()
    if enc["training"] != "frozen" and enc["arch"] != "hog"
]
SOFTMAX_ENCODERS = HEADS if CNN_SOFTMAX in CLASSIFIERS else []
ENSEMBLES = config["evaluation"]["ensembles"]


for _name, _ens in ENSEMBLES.items():
    for _member in _ens["members"]:
        check_ensemble_member(_name, _member)


EVALUATION_PARAMS = dict(
    positive_label=config["positive_label"],
    image_aggregation=config["evaluation"]["image_aggregation"],
    any_positive_threshold=config["evaluation"]["any_positive_threshold"],
    n_boot=config["evaluation"]["n_boot"],
    bootstrap_seed=config["evaluation"]["bootstrap_seed"],
    ci_level=config["evaluation"]["ci_level"],
    plot_kinds=PLOT_KINDS,
)


rule fit_classifiers:
    input:
        store=result("embeddings/{dataset}/{encoder}.zarr"),
        ids=result("embeddings/{dataset}/{encoder}_rois.parquet"),
        folds=result("folds.csv"),
    output:
        roi_predictions=result("evaluate/{dataset}/{encoder}/roi_predictions.parquet"),
        image_predictions=result(
            "evaluate/{dataset}/{encoder}/image_predictions.parquet"
        ),
        metrics=result("evaluate/{dataset}/{encoder}/metrics.csv"),
        metrics_per_class=result("evaluate/{dataset}/{encoder}/metrics_per_class.csv"),
        models=expand(
            result(
                "evaluate/{{dataset}}/{{encoder}}/models/{classifier}_fold_{fold}.skops"
            ),
            classifier=FITTED,
            fold=FOLDS,
        ),
        confusion=report(
            expand(
                result("plots/{{dataset}}/{{encoder}}/{classifier}_confusion.png"),
                classifier=FITTED,
            ),
            caption="../report/confusion.rst",
            category="5. Plots",
            subcategory="{dataset} / {encoder}",
        ),
        roc=report(
            expand(
                result("plots/{{dataset}}/{{encoder}}/{classifier}_roc.png"),
                classifier=FITTED,
            ),
            caption="../report/roc.rst",
            category="5. Plots",
            subcategory="{dataset} / {encoder}",
        ),
        calibration=report(
            expand(
                result("plots/{{dataset}}/{{encoder}}/{classifier}_calibration.png"),
                classifier=FITTED,
            ),
            caption="../report/calibration.rst",
            category="5. Plots",
            subcategory="{dataset} / {encoder}",
        ),
        wbc_count=report(
            expand(
                result("plots/{{dataset}}/{{encoder}}/{classifier}_wbc_count.png"),
                classifier=FITTED,
            ),
            caption="../report/wbc_count.rst",
            category="5. Plots",
            subcategory="{dataset} / {encoder}",
        ),
    log:
        logfile("evaluate/{dataset}/{encoder}.log"),
    benchmark:
        benchfile("evaluate/{dataset}/{encoder}.tsv")
    conda:
        "../../envs/leukflow.yaml"
    threads: 1
    params:
        **EVALUATION_PARAMS,
        classifiers=FITTED,
        inner_folds=config["evaluation"]["inner_folds"],
    script:
        "../scripts/fit_classifiers.py"


rule score_cnn_softmax:
    input:
        store=result("embeddings/{dataset}/{encoder}.zarr"),
        ids=result("embeddings/{dataset}/{encoder}_rois.parquet"),
        folds=result("folds.csv"),
    output:
        roi_predictions=result(
            "evaluate/{dataset}/{encoder}/cnn_softmax/roi_predictions.parquet"
        ),
        image_predictions=result(
            "evaluate/{dataset}/{encoder}/cnn_softmax/image_predictions.parquet"
        ),
        metrics=result("evaluate/{dataset}/{encoder}/cnn_softmax/metrics.csv"),
        metrics_per_class=result(
            "evaluate/{dataset}/{encoder}/cnn_softmax/metrics_per_class.csv"
        ),
        plots=expand(
            result("plots/{{dataset}}/{{encoder}}/cnn_softmax_{kind}.png"),
            kind=PLOT_KINDS,
        ),
    log:
        logfile("evaluate/{dataset}/{encoder}_cnn_softmax.log"),
    benchmark:
        benchfile("evaluate/{dataset}/{encoder}_cnn_softmax.tsv")
    wildcard_constraints:
        encoder="|".join(HEADS) or "^$",
    conda:
        "../../envs/leukflow.yaml"
    params:
        **EVALUATION_PARAMS,
    script:
        "../scripts/score_cnn_softmax.py"


rule vote_ensemble:
    input:
        members=lambda wc: [
            member_predictions(m).format(dataset=wc.dataset)
            for m in ENSEMBLES[wc.ensemble]["members"]
        ],
        folds=result("folds.csv"),
    output:
        roi_predictions=result(
            "evaluate/{dataset}/ensemble/{ensemble}/roi_predictions.parquet"
        ),
        image_predictions=result(
            "evaluate/{dataset}/ensemble/{ensemble}/image_predictions.parquet"
        ),
        metrics=result("evaluate/{dataset}/ensemble/{ensemble}/metrics.csv"),
        metrics_per_class=result(
            "evaluate/{dataset}/ensemble/{ensemble}/metrics_per_class.csv"
        ),
        plots=expand(
            result("plots/{{dataset}}/ensemble/{{ensemble}}_{kind}.png"),
            kind=PLOT_KINDS,
        ),
    log:
        logfile("evaluate/{dataset}/ensemble_{ensemble}.log"),
    benchmark:
        benchfile("evaluate/{dataset}/ensemble_{ensemble}.tsv")
    wildcard_constraints:
        ensemble="|".join(ENSEMBLES) or "^$",
    conda:
        "../../envs/leukflow.yaml"
    params:
        **EVALUATION_PARAMS,
        members=lambda wc: ENSEMBLES[wc.ensemble]["members"],
        vote=lambda wc: ENSEMBLES[wc.ensemble]["vote"],
    script:
        "../scripts/vote_ensemble.py"


rule summarise_metrics:
    input:
        metrics=evaluations("metrics.csv"),
        metrics_per_class=evaluations("metrics_per_class.csv"),
    output:
        metrics=report(
            result("metrics.csv"),
            caption="../report/metrics.rst",
            category="4. Metrics",
            subcategory="all datasets",
        ),
        metrics_per_class=report(
            result("metrics_per_class.csv"),
            caption="../report/metrics_per_class.rst",
            category="4. Metrics",
            subcategory="all datasets",
        ),
    log:
        logfile("evaluate/summarise_metrics.log"),
    benchmark:
        benchfile("evaluate/summarise_metrics.tsv")
    localrule: True
    conda:
        "../../envs/leukflow.yaml"
    params:
        controls=CONTROLS,
    script:
        "../scripts/summarise_metrics.py"


rule compare_to_papers:
    input:
        metrics=result("metrics.csv"),
    output:
        comparison=report(
            result("comparison.csv"),
            caption="../report/comparison.rst",
            category="4. Metrics",
        ),
        plot=report(
            result("comparison.png"),
            caption="../report/comparison.rst",
            category="4. Metrics",
        ),
    log:
        logfile("evaluate/compare_to_papers.log"),
    benchmark:
        benchfile("evaluate/compare_to_papers.tsv")
    localrule: True
    conda:
        "../../envs/leukflow.yaml"
    params:
        published=config["evaluation"]["published"],
        twins=TWINS,
        protocols=PROTOCOLS,
        controls=CONTROLS,
    script:
        "../scripts/compare_to_papers.py"
