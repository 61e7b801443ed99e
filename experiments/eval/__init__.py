"""Evaluation: retrieval metrics, clustering, face verification, embedding quality and geometry,
cross-modal retrieval."""
