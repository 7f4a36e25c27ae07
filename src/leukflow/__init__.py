"""leukflow: detection of acute lymphoblastic leukemia in blood-smear images.

The library behind the Snakemake workflow. Each module is one stage of the
data flow (``ingest -> segment -> folds -> models -> embed -> evaluate``) and
imports only the stages to its left and :mod:`leukflow.data.io`.
"""

__version__ = "0.1.0"
