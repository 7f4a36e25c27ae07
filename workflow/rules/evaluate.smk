# Fit and score: classifiers per fold on the embeddings -> models, predictions,
# metrics (per fold, mean, std, pooled with bootstrap CIs; per class), plots;
# the encoders' own heads (cnn_softmax) and votes (ensembles) scored the same way;
# all in metrics.csv, and the leaky and honest figures beside the papers' in
# comparison.csv.

# Plots per dataset x model, plots/<dataset>/<encoder>/<classifier>_<kind>.png
# (PLAN.plot); fit_classifiers names one output list per kind.


rule fit_classifiers:
    input:
        store=PLAN.embeddings(),
        ids=PLAN.embedding_ids(),
        folds=result("folds.csv"),
    output:
        roi_predictions=PLAN.fitted_file("roi_predictions.parquet"),
        image_predictions=PLAN.fitted_file("image_predictions.parquet"),
        metrics=PLAN.fitted_file("metrics.csv"),
        metrics_per_class=PLAN.fitted_file("metrics_per_class.csv"),
        calibration_predictions=PLAN.fitted_file("calibration_predictions.parquet"),
        conformal=PLAN.fitted_file("conformal.json"),
        models=[
            PLAN.model(classifier=c, fold=k) for c in PLAN.fitted for k in PLAN.folds
        ],
        confusion=report(
            [PLAN.plot("confusion", classifier=c) for c in PLAN.fitted],
            caption="../report/confusion.rst",
            category="5. Plots",
            subcategory="{dataset} / {encoder}",
        ),
        roc=report(
            [PLAN.plot("roc", classifier=c) for c in PLAN.fitted],
            caption="../report/roc.rst",
            category="5. Plots",
            subcategory="{dataset} / {encoder}",
        ),
        calibration=report(
            [PLAN.plot("calibration", classifier=c) for c in PLAN.fitted],
            caption="../report/calibration.rst",
            category="5. Plots",
            subcategory="{dataset} / {encoder}",
        ),
        wbc_count=report(
            [PLAN.plot("wbc_count", classifier=c) for c in PLAN.fitted],
            caption="../report/wbc_count.rst",
            category="5. Plots",
            subcategory="{dataset} / {encoder}",
        ),
        risk_coverage=report(
            [PLAN.plot("risk_coverage", classifier=c) for c in PLAN.fitted],
            caption="../report/risk_coverage.rst",
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
        classifiers=PLAN.fitted,
        inner_folds=config["evaluation"]["inner_folds"],
    script:
        "../scripts/fit_classifiers.py"


rule score_cnn_softmax:
    input:
        store=PLAN.embeddings(),
        ids=PLAN.embedding_ids(),
        folds=result("folds.csv"),
    output:
        roi_predictions=PLAN.head_file("roi_predictions.parquet"),
        image_predictions=PLAN.head_file("image_predictions.parquet"),
        metrics=PLAN.head_file("metrics.csv"),
        metrics_per_class=PLAN.head_file("metrics_per_class.csv"),
        calibration_predictions=PLAN.head_file("calibration_predictions.parquet"),
        conformal=PLAN.head_file("conformal.json"),
        plots=[PLAN.plot(kind, classifier=CNN_SOFTMAX) for kind in PLOT_KINDS],
    log:
        logfile("evaluate/{dataset}/{encoder}_cnn_softmax.log"),
    benchmark:
        benchfile("evaluate/{dataset}/{encoder}_cnn_softmax.tsv")
    wildcard_constraints:
        encoder="|".join(PLAN.heads) or "^$",
    conda:
        "../../envs/leukflow.yaml"
    params:
        **EVALUATION_PARAMS,
    script:
        "../scripts/score_cnn_softmax.py"


rule vote_ensemble:
    input:
        members=lambda wc: [
            PLAN.member_predictions(m, wc.dataset)
            for m in PLAN.ensembles[wc.ensemble]["members"]
        ],
        member_calibrations=lambda wc: [
            PLAN.member_predictions(m, wc.dataset).replace(
                "roi_predictions", "calibration_predictions"
            )
            for m in PLAN.ensembles[wc.ensemble]["members"]
        ],
        folds=result("folds.csv"),
    output:
        roi_predictions=PLAN.ensemble_file("roi_predictions.parquet"),
        image_predictions=PLAN.ensemble_file("image_predictions.parquet"),
        metrics=PLAN.ensemble_file("metrics.csv"),
        metrics_per_class=PLAN.ensemble_file("metrics_per_class.csv"),
        calibration_predictions=PLAN.ensemble_file("calibration_predictions.parquet"),
        conformal=PLAN.ensemble_file("conformal.json"),
        plots=[
            PLAN.plot(kind, encoder=ENSEMBLE, classifier="{ensemble}")
            for kind in PLOT_KINDS
        ],
    log:
        logfile("evaluate/{dataset}/ensemble_{ensemble}.log"),
    benchmark:
        benchfile("evaluate/{dataset}/ensemble_{ensemble}.tsv")
    wildcard_constraints:
        ensemble="|".join(PLAN.ensembles) or "^$",
    conda:
        "../../envs/leukflow.yaml"
    params:
        **EVALUATION_PARAMS,
        members=lambda wc: PLAN.ensembles[wc.ensemble]["members"],
        vote=lambda wc: PLAN.ensembles[wc.ensemble]["vote"],
    script:
        "../scripts/vote_ensemble.py"


rule reliance_test:
    input:
        checkpoints=lambda wc: PLAN.checkpoints(wc.dataset, wc.encoder),
        crops=PLAN.segment_file("crops.zarr"),
        ids=PLAN.embedding_ids(),
        store=PLAN.embeddings(),
        folds=result("folds.csv"),
        models=[
            PLAN.model(classifier=c, fold=k) for c in PLAN.fitted for k in PLAN.folds
        ],
    output:
        metrics=PLAN.fitted_file("reliance_metrics.csv"),
    log:
        logfile("evaluate/{dataset}/{encoder}_reliance.log"),
    benchmark:
        benchfile("evaluate/{dataset}/{encoder}_reliance.tsv")
    conda:
        "../../envs/leukflow.yaml"
    threads: 2
    params:
        **EVALUATION_PARAMS,
        classifiers=list(PLAN.fitted),
        head=lambda wc: wc.encoder in PLAN.softmax_encoders,
        seed=0,
    script:
        "../scripts/reliance_test.py"


rule summarise_metrics:
    input:
        metrics=PLAN.evaluations("metrics.csv"),
        metrics_per_class=PLAN.evaluations("metrics_per_class.csv"),
        reliance=PLAN.reliance_files(),
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
        controls=PLAN.controls,
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
        twins=PLAN.twins,
        protocols=PLAN.protocols,
        controls=PLAN.controls,
    script:
        "../scripts/compare_to_papers.py"
