"""Ray Data UDFs that read sources of a webdataset or folder input into INPUT_SCHEMA tables (manifest
files are read record by record by the work units, `vesl.annotate.units`)."""

from __future__ import annotations

import pyarrow as pa

from vesl.annotate.sources.config import InputConfig
from vesl.annotate.sources.folder import folder_row
from vesl.annotate.sources.img2dataset import iter_img2dataset_files, iter_img2dataset_tar
from vesl.annotate.sources.rows import ORDINAL_FILE_SHIFT, chunk_tables
from vesl.annotate.sources.webdataset import iter_webdataset


def read_webdataset_files(batch: pa.Table, config: InputConfig, storage_options, chunk_rows: int = 256):
    """Ray Data generator UDF: one row per tar (with its img2dataset status table, if any) in,
    INPUT_SCHEMA batches out."""
    for unit in batch.to_pylist():
        base = unit["index"] << ORDINAL_FILE_SHIFT
        if unit.get("status"):
            rows = iter_img2dataset_tar(unit["uri"], unit["status"], base, config, storage_options)
        else:
            samples = iter_webdataset(unit["uri"], storage_options)
            rows = ({**sample, "ordinal": base + k} for k, sample in enumerate(samples))
        yield from chunk_tables(rows, chunk_rows)


def source_reader(kind: str):
    """The UDF that reads sources of a webdataset or folder input (KIND)."""
    return read_webdataset_files if kind == "webdataset" else read_folder_files


def read_folder_files(batch: pa.Table, config: InputConfig, storage_options, chunk_rows: int = 256):
    """Ray Data generator UDF for image folders. A row with `status` is one img2dataset shard of the
    files layout (NNNNN.parquet + NNNNN/); any other row is one image with its .txt/.json sidecars."""
    units = batch.to_pylist()
    images = [u for u in units if not u.get("status")]
    if images:
        yield from chunk_tables((folder_row(u, config, storage_options) for u in images), chunk_rows)
    for unit in units:
        if unit.get("status"):
            yield from chunk_tables(iter_img2dataset_files(unit, config, storage_options), chunk_rows)
