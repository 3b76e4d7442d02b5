"""Studies over the library (development sets, training sweeps): run as ``python -m pipeline.studies.NAME``."""
