"""Tracking: the MLflow store and runs, provenance, secrets kept out of logs, system metrics,
dataset inputs and the shared tracking server."""
