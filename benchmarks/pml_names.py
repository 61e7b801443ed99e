"""pytorch-metric-learning's names of the headline metrics, by the keys tripletlab logs them under.

The metrics themselves and the labels tables print are ``experiments.eval.retrieval.HEADLINE_METRICS``;
this maps each key to the one ``AccuracyCalculator`` uses for the same number.
"""

from __future__ import annotations

PML_NAMES = {
    "precision_at_1": "precision_at_1",
    "r_precision": "r_precision",
    "map_at_r": "mean_average_precision_at_r",
}
