"""vesl: region-text training data at scale (captioner -> spaCy phrases -> OWLv2 -> Parquet)."""

__version__ = "0.1.0"
