"""One pipeline: config -> data -> model -> objective -> train -> evaluate -> log.

``config`` (typed config, overrides, validation), ``data/`` (the dataset registry, formats, splits,
the PK sampler, device batches), ``models/`` (image backbones, the text tower, two towers),
``train/`` (the loop, a run's lifecycle, folds, interrupts), ``eval/`` (retrieval, clustering,
verification, embedding quality, cross-modal), ``tracking/`` (MLflow, provenance, secrets, the
server) and ``commands/`` (``tripletlab losses``, ``train`` and ``evaluate``).
"""
