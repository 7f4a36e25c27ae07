"""Rule compare_to_papers: the papers' figures beside leukflow's leaky and grouped ones."""

from leukflow.core.runlog import start_log
from leukflow.data.io import read_table, write_table
from leukflow.evaluate.compare import compare_figures, plot_comparison

p = snakemake.params
log = start_log("compare_to_papers", snakemake.log[0], dict(p))
comparison = compare_figures(
    read_table(snakemake.input.metrics),
    published=p.published,
    twins=p.twins,
    protocols=p.protocols,
    controls=p.controls,
)
write_table(comparison, snakemake.output.comparison)
plot_comparison(comparison, snakemake.output.plot)
log.info("paper vs leukflow (leaky, grouped):\n%s", comparison.to_string())
