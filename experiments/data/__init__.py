"""Data: the dataset registry (images and pairs), file formats, splits, folds, the PK sampler and
device-resident batches."""
