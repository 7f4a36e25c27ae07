"""Data: dataset listers, ingest, file formats, the per-image cache and the demo set."""
