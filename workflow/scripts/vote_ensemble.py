"""Rule vote_ensemble: a soft or majority vote over models' ROI predictions, scored."""

from leukflow.core.runlog import start_log
from leukflow.data.io import read_table, write_table
from leukflow.evaluate.classifiers import vote_predictions
from leukflow.evaluate.plots import PLOTTERS
from leukflow.evaluate.scoring import score_predictions

p, out = snakemake.params, snakemake.output
dataset, ensemble = snakemake.wildcards.dataset, snakemake.wildcards.ensemble
log = start_log("vote_ensemble", snakemake.log[0], dict(p))
folds = read_table(snakemake.input.folds)
folds = folds[folds["dataset"] == dataset]
members = {}
for member, path in zip(p.members, snakemake.input.members, strict=True):
    preds = read_table(path)
    members[member] = preds[preds["classifier"] == member.split("/")[1]]
# one leaky member (random folds, an all_labels encoder) makes the vote leaky
leaky = any(bool(m["leaky"].any()) for m in members.values())
votes = vote_predictions({m: d.drop(columns="leaky") for m, d in members.items()},
                         vote=p.vote, positive_label=p.positive_label, name=ensemble)  # fmt: skip
result = score_predictions(
    votes,
    folds.assign(leaky=folds["leaky"] | leaky),
    positive_label=p.positive_label,
    image_aggregation=p.image_aggregation,
    any_positive_threshold=p.any_positive_threshold,
    n_boot=p.n_boot,
    bootstrap_seed=p.bootstrap_seed,
    ci_level=p.ci_level,
)
keys = {"dataset": dataset, "encoder": "ensemble"}
for table, path in (
    (result.metrics, out.metrics),
    (result.metrics_per_class, out.metrics_per_class),
):
    write_table(table.assign(**keys)[[*keys, *table.columns]], path)
write_table(result.roi_predictions, out.roi_predictions)
write_table(result.image_predictions, out.image_predictions)
levels = {"roi": result.roi_predictions, "image": result.image_predictions}
for kind, png in zip(p.plot_kinds, out.plots, strict=True):
    PLOTTERS[kind](levels, title=f"{dataset} / {ensemble} ({p.vote} vote)",
                   positive_label=p.positive_label, path=png)  # fmt: skip
log.info("%s vote of %s on %d test ROIs", p.vote, list(p.members), len(votes))
