"""vesl: region-text training data at scale (captioner -> spaCy phrases -> OWLv2 -> Parquet)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `vesl.read_regions` / `vesl.write_regions` without importing pandas/pyarrow on `import vesl`
    if name in ("read_regions", "write_regions"):
        from vesl.shards import read

        return getattr(read, name)
    raise AttributeError(f"module 'vesl' has no attribute {name!r}")
