"""Plumbing: configuration, files, errors, lineage (what code a result came from), MLflow, set-up and the
user-facing commands that are not stages (fetch, ui, predict)."""
