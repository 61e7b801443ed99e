"""One reader per dataset file format, each returning :class:`experiments.data.base.SourceImages`."""
