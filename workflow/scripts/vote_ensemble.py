"""Rule vote_ensemble: a soft or majority vote over models' ROI predictions, scored."""

from leukflow.core.runlog import start_log
from leukflow.data.io import read_table
from leukflow.evaluate.classifiers import vote_predictions
from leukflow.evaluate.conformal import vote_calibration_predictions
from leukflow.evaluate.plots import plot_classifier
from leukflow.evaluate.scoring import ScoringSettings, score_predictions, write_evaluation

p, out = snakemake.params, snakemake.output
dataset, ensemble = snakemake.wildcards.dataset, snakemake.wildcards.ensemble
log = start_log("vote_ensemble", snakemake.log[0], dict(p))
folds = read_table(snakemake.input.folds)
folds = folds[folds["dataset"] == dataset]
members, calibrations = {}, {}
for member, path, cal in zip(p.members, snakemake.input.members,
                             snakemake.input.member_calibrations, strict=True):  # fmt: skip
    preds, cal = read_table(path), read_table(cal)
    members[member] = preds[preds["classifier"] == member.split("/")[1]]
    calibrations[member] = cal[cal["classifier"] == member.split("/")[1]]
# one leaky member (random folds, an all_labels encoder) makes the vote leaky
leaky = any(bool(m["leaky"].any()) for m in members.values())
votes = vote_predictions({m: d.drop(columns="leaky") for m, d in members.items()},
                         vote=p.vote, positive_label=p.positive_label, name=ensemble)  # fmt: skip
calibration = vote_calibration_predictions(
    calibrations, vote=p.vote, positive_label=p.positive_label, name=ensemble
)
result = score_predictions(votes, folds.assign(leaky=folds["leaky"] | leaky),
                           ScoringSettings.from_params(p), calibration, scheme="vote")  # fmt: skip
write_evaluation(result, out, keys={"dataset": dataset, "encoder": "ensemble"})
plot_classifier(result, dict(zip(p.plot_kinds, out.plots, strict=True)), classifier=ensemble,
                title=f"{dataset} / {ensemble} ({p.vote} vote)",
                positive_label=p.positive_label)  # fmt: skip
log.info("%s vote of %s on %d test ROIs", p.vote, list(p.members), len(votes))
