"""Shared plumbing: the config and its schema, provenance, run logs, parallel map."""
