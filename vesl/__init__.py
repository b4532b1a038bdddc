"""vesl: region-text training data at scale (captioner -> spaCy phrases -> OWLv2 -> Parquet)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `vesl.read_regions` without importing pandas/pyarrow on `import vesl`
    if name == "read_regions":
        from vesl.read import read_regions

        return read_regions
    raise AttributeError(f"module 'vesl' has no attribute {name!r}")
