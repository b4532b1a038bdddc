"""Readers: a manifest (Parquet, JSONL, CSV), img2dataset WebDataset tars, or a folder of images,
local or on any fsspec URI, into rows of INPUT_SCHEMA: image_id, image_uri, image_bytes, alt_text
(plus the reject columns, set when an input cannot even be read)."""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from schemas.columns import INPUT_SCHEMA, REJECT_MESSAGE, REJECT_REASON, REJECT_STAGE
from schemas.rejects import READ_STAGE
from schemas.rejects import RejectReason as R
from vesl.core.settings import Settings
from vesl.core.storage import filesystem, join_uri, parent_uri, uri_prefix
from vesl.core.text import describe_error

MANIFEST_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
ORDINAL_FILE_SHIFT = 32
MAX_URI_CHARS = 8192  # longer "URIs" are data pasted into the wrong column, not places to fetch from
READ_ERROR, READ_REASON, SOURCE = "__vesl_read_error__", "__vesl_read_reason__", "__vesl_source__"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class InputConfig(Settings):
    format: Literal["auto", "manifest", "webdataset", "folder"] = Field(
        default="auto",
        description="'auto': img2dataset's output folders by their layout (NNNNN.tar -> webdataset, NNNNN.parquet "
        "with images -> manifest, NNNNN/ image folders -> folder; their NNNNN.parquet status tables and "
        "NNNNN_stats.json beside them), a .parquet/.jsonl/.json/.csv file (or a folder of them) is a manifest, "
        ".tar files are WebDataset shards, any other folder is a folder of images. Any other value forces that "
        "reading of the input (e.g. 'webdataset': only the folder's .tar files).",
    )
    allow_empty: bool = Field(default=False, description="Accept an input that yields no inputs at all (the run "
                              "then writes an empty OUTPUT). Off: that is an error naming what the input holds.")
    status_column: str = Field(default="status", description="img2dataset's per-row download status: a row whose "
                               "status is not 'success' becomes a `read` reject with that status as its reason and "
                               "ERROR_COLUMN as its message, instead of a second download.")
    error_column: str = Field(default="error_message", description="img2dataset's download error message.")
    id_column: list[str] = Field(default=["id", "key", "image_id"], description="Id column names, first found wins.")
    image_column: list[str] = Field(default=["image", "url", "path", "image_uri", "image_path"],
                                    description="Image path/URI column names (img2dataset: url).")
    bytes_column: list[str] = Field(default=["image_bytes", "jpg", "png", "webp", "bytes"],
                                    description="Encoded image column names (img2dataset: jpg).")
    alt_text_column: list[str] = Field(default=["alt_text", "caption", "text", "txt"],
                                       description="Alt-text column names (img2dataset: caption).")
    image_extensions: list[str] = Field(default=list(IMAGE_SUFFIXES), description="Files a folder input reads.")
    limit: int | None = Field(default=None, ge=1, description="Read only the first N inputs (smoke runs): the "
                              "plan scans source files in order until it has N, and keeps the first N.")
    unit_rows: int = Field(
        default=10_000, ge=1,
        description="Inputs per work unit: the input is split once into units (a manifest every this many records, "
        "a tar or img2dataset shard each, a folder's images this many at a time), each written as one shard, one "
        "rejects file and one completion record. A resume redoes only units without a record. Used when the plan is "
        "made (the first run on an OUTPUT); later runs keep the saved units.",
    )
    slice: str | None = Field(
        default=None, pattern=r"^\d+/\d+$",
        description="I/N: process only slice I of N of the plan's units (contiguous), so N jobs (e.g. N RayJobs) "
        "share one input and one OUTPUT. `--shard I/N` sets it. Slices of one N never overlap; every job reads "
        "the same saved plan.",
    )
    block_rows: int = Field(
        default=64, ge=1,
        description="Rows per Ray Data block, the unit that streams from stage to stage. A reader emits a whole "
        "manifest file as one block; it is split into blocks of this size so stages overlap and shards land "
        "progressively (64 decoded 1024x768 images are about 150 MB). Smaller blocks cost per-block overhead, "
        "larger ones fill the pipeline and the object-store budget slowly (README, Performance).",
    )


def derive_image_id(uri: str | None, data: bytes | None, row: Mapping[str, Any] | None = None) -> str:
    """A stable id when the input has none: a hash of the source URI, else of the bytes."""
    if uri:
        payload = b"uri:" + uri.encode()
    elif data:
        payload = b"bytes:" + data
    else:
        payload = b"row:" + json.dumps(row or {}, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:32]


def _first(names: list[str], available: list[str]) -> str | None:
    return next((n for n in names if n in available), None)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def resolve_image_uri(value: str | None, base: str) -> str | None:
    """Manifest paths without a scheme are relative to the manifest's folder."""
    if not value:
        return None
    value = value.strip()
    if "://" in value or posixpath.isabs(value):
        return value
    return join_uri(base, value)


def upstream_failure(status: Any, message: Any) -> tuple[str | None, str | None]:
    """(reject message, reason) for an img2dataset status that is not a success, else (None, None).
    The reason is img2dataset's own status (failed_to_download, failed_to_resize, ...)."""
    status = _text(status)
    if status is None or status.strip() in ("", "success"):
        return None, None
    reason = re.sub(r"[^a-z0-9_]+", "_", status.strip().lower())[:48] or "upstream_failed"
    return f"img2dataset {status}: {_text(message) or 'no error message'}"[:500], reason


def normalize_rows(rows: list[Mapping[str, Any]], ordinals: list[int], config: InputConfig, base: str) -> pa.Table:
    """Map manifest rows (whatever their column names and value types) onto INPUT_SCHEMA.

    A row given as {READ_ERROR: message} (a line that is not JSON, say) becomes a 'read' reject."""
    out: dict[str, list] = {f.name: [] for f in INPUT_SCHEMA}
    for row, ordinal in zip(rows, ordinals):
        names = list(row)
        error = row.get(READ_ERROR)
        image_col, bytes_col = _first(config.image_column, names), _first(config.bytes_column, names)
        id_col, alt_col = _first(config.id_column, names), _first(config.alt_text_column, names)
        image = row.get(image_col) if image_col else None
        data = row.get(bytes_col) if bytes_col else None
        if isinstance(image, (bytes, bytearray, memoryview)):  # an `image` column of encoded bytes, not a path
            data, image = (data if data is not None else image), None
        uri = resolve_image_uri(_text(image), base)
        data = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else None
        given = _text(row.get(id_col)) if id_col else None
        given = given.strip() if given else ""
        if error is None and config.status_column in row and config.error_column in row:
            error, reason = upstream_failure(row.get(config.status_column), row.get(config.error_column))
            row = {**row, READ_REASON: reason} if error is not None else row
        if error is None and uri is not None and len(uri) > MAX_URI_CHARS:
            error, row = (f"an image URI of {len(uri)} characters (more than {MAX_URI_CHARS}): {uri[:200]}…",
                          {**row, READ_REASON: R.BAD_URI.value})
            uri = uri[:MAX_URI_CHARS]
        if error is not None:
            uri = uri or row.get(SOURCE)
            given = given or derive_image_id(f"{row.get(SOURCE)}#{ordinal}", None)
        out["image_id"].append(given or derive_image_id(uri, data, {k: v for k, v in row.items() if k != bytes_col}))
        out["image_uri"].append(uri)
        out["image_bytes"].append(data)
        out["alt_text"].append(_text(row.get(alt_col)) if alt_col else None)
        out["ordinal"].append(ordinal)
        out[REJECT_STAGE].append(READ_STAGE if error is not None else None)
        out[REJECT_REASON].append(row.get(READ_REASON, R.BAD_MANIFEST_ROW.value) if error is not None else None)
        out[REJECT_MESSAGE].append(error)
    return pa.table(out, schema=INPUT_SCHEMA)


CSV_MAX_RECORD_LINES = 64  # a quoted CSV field may span lines; an open quote longer than this is a broken row


def _bad_row(uri: str, where: str, error: Any) -> dict[str, Any]:
    return {READ_ERROR: f"{uri} {where}: {error}"[:500], SOURCE: uri}


def _utf8_problem(fields: list[str]) -> str | None:
    """What is wrong with fields decoded with surrogateescape (the marks of undecodable bytes)."""
    for value in fields:
        if value.isascii():
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            try:
                value.encode("utf-8", "surrogateescape").decode("utf-8")
            except UnicodeDecodeError as e:
                return f"invalid UTF-8: {e.reason} at byte {e.start} of a field"
    return None


Record = tuple[int, int, dict[str, Any]]  # (line or row number, byte offset or row number, raw row)


def iter_csv_rows(lines: Iterator[bytes], uri: str, header: list[str] | None = None, first_line: int = 1,
                  first_offset: int = 0, on_header=None) -> Iterator[Record]:
    """Records of a CSV file as (first line, byte offset, row), every value a string or None. Without
    HEADER the first record is the header (ON_HEADER is called with it). A record that cannot be read
    (bad quoting, invalid UTF-8, a wrong number of fields) becomes one error row naming its line, and
    reading goes on with the next record: an unclosed quote costs the row it opens, not the rest of
    the file (a record may span at most CSV_MAX_RECORD_LINES lines). LINES may start mid-file at a
    record's first line (FIRST_LINE, FIRST_OFFSET: where they start), with the HEADER read before."""
    reader = _CsvRecords(uri, header, on_header)
    offset = first_offset
    for lineno, raw in enumerate(lines, start=first_line):
        reader.pending.append((lineno, offset, raw.decode("utf-8", errors="surrogateescape")))
        offset += len(raw)
        yield from reader.drain(final=False)
    yield from reader.drain(final=True)


def _parse_csv_record(text: str) -> list[str] | None:
    """The record in TEXT, None when TEXT ends inside a quoted field; csv.Error when it is broken."""
    import csv

    if '"' not in text and "\r" not in text.rstrip("\r\n"):  # no quoting: a plain split is the CSV reading
        return text.rstrip("\r\n").split(",") if text.strip("\r\n") else []
    try:
        records = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            return None
        raise
    if len(records) > 1:
        raise csv.Error("more than one record on one line (a bare carriage return?)")
    return records[0] if records else []


class _CsvRecords:
    """The state of iter_csv_rows: the header once read, and the lines of the record being assembled."""

    def __init__(self, uri: str, header: list[str] | None, on_header) -> None:
        self.uri, self.header, self.on_header = uri, header, on_header
        self.pending: list[tuple[int, int, str]] = []  # (line, offset, text) of the record being assembled

    def emit(self, lineno: int, fields: list[str]) -> dict[str, Any] | None:
        if not fields or fields == [""]:
            return None  # a blank line
        problem = _utf8_problem(fields)
        if self.header is None:
            if problem:
                raise ValueError(f"header line: {problem}")
            self.header = fields
            if self.on_header is not None:
                self.on_header(fields)
            return None
        if problem:
            return _bad_row(self.uri, f"line {lineno}", problem)
        if len(fields) != len(self.header):
            return _bad_row(self.uri, f"line {lineno}", f"{len(fields)} fields, the header has {len(self.header)}")
        return {k: (v if v != "" else None) for k, v in zip(self.header, fields)}

    def bad(self, problem: str) -> Record:
        """The first pending line as an error row (its record cannot be read), dropped from PENDING."""
        lineno, offset, _ = self.pending.pop(0)
        if self.header is None:
            raise ValueError(f"header line: {problem}")
        return lineno, offset, _bad_row(self.uri, f"line {lineno}", f"bad CSV: {problem}")

    def drain(self, final: bool) -> Iterator[Record]:
        """Emit every record that PENDING's lines complete; keep an open one unless FINAL or too long."""
        import csv

        pending = self.pending
        while pending:
            lineno, offset = pending[0][0], pending[0][1]
            for k in range(1, len(pending) + 1):  # the shortest run of lines that makes a record
                try:
                    fields = _parse_csv_record("".join(t for _, _, t in pending[:k]))
                except csv.Error as e:
                    yield self.bad(str(e))  # the next lines may be fine on their own: read them again
                    break
                if fields is not None:
                    del pending[:k]
                    row = self.emit(lineno, fields)
                    if row is not None:
                        yield lineno, offset, row
                    break
            else:  # every run of lines ends inside a quoted field
                if not final and len(pending) < CSV_MAX_RECORD_LINES:
                    return  # the field goes on on the next line
                yield self.bad("a quote that never closes")


def csv_header(f, uri: str) -> list[str] | None:
    """The header record of the CSV file F (opened at its start)."""
    got: list[list[str]] = []
    for _ in iter_csv_rows(iter(f), uri, on_header=got.append):
        break
    return got[0] if got else None


def iter_parquet_rows(f, uri: str, chunk_rows: int, start: int = 0) -> Iterator[list[Record]]:
    """Chunks of records (row, row, raw row) of a Parquet manifest, from row START on, by row group. A
    row group that cannot be read becomes one error row per row it holds (the footer says how many),
    and the next row group is read; a row that cannot be converted (invalid UTF-8 in a string column)
    becomes one error row."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    first = 0  # the row number of the group's first row
    for group in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        if first + n <= start:
            first += n
            continue
        skip = max(0, start - first)
        try:
            batches = list(pf.iter_batches(batch_size=chunk_rows, row_groups=[group]))
        except Exception as e:  # noqa: BLE001 - a broken row group costs its rows, each counted
            message = f"row group {group} unreadable: {describe_error(e)}"
            yield [(first + k, first + k, _bad_row(uri, f"row {k}", message)) for k in range(skip, n)]
            first += n
            continue
        at = first
        for batch in batches:
            if at + batch.num_rows <= first + skip:
                at += batch.num_rows
                continue
            lo = max(0, first + skip - at)
            batch = batch.slice(lo)
            try:
                rows = batch.to_pylist()
            except Exception:  # noqa: BLE001 - find the rows that do not convert
                rows = []
                for k in range(batch.num_rows):
                    try:
                        rows.append(batch.slice(k, 1).to_pylist()[0])
                    except Exception as e:  # noqa: BLE001
                        rows.append(_bad_row(uri, f"row group {group} row {at - first + lo + k}", describe_error(e)))
            yield [(at + lo + k, at + lo + k, row) for k, row in enumerate(rows)]
            at += lo + batch.num_rows
        first += n


def iter_manifest_records(uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None,
                          start: tuple[int, int] | None = None, chunk_rows: int = 2048) -> Iterator[list[Record]]:
    """Chunks of records (line or row, byte offset or row, raw row) of one manifest file, in file
    order, from START (a record's (line, offset) as an earlier reading gave it) on: Parquet by row
    group, CSV record by record as strings (one odd value cannot change a column's type), JSON lines
    one by one. A row that cannot be read becomes an error row (a `read` reject naming its line) and
    the rest of the file is still read; a file that cannot be opened at all becomes one error row."""
    kind = MANIFEST_SUFFIXES[posixpath.splitext(uri.split("?")[0])[1].lower()]
    fs, path = filesystem(uri, storage_options)
    line, offset = start or (1 if kind != "parquet" else 0, 0)
    try:
        with fs.open(path, "rb") as f:
            if kind == "parquet":
                yield from iter_parquet_rows(f, uri, chunk_rows, start=offset)
                return
            header = None
            if kind == "csv" and offset > 0:
                header = csv_header(f, uri)
                f.seek(offset)
            elif offset:
                f.seek(offset)
            records = (iter_csv_rows(iter(f), uri, header, line, offset) if kind == "csv"
                       else _iter_json_rows(f, uri, line, offset))
            chunk: list[Record] = []
            for record in records:
                chunk.append(record)
                if len(chunk) >= chunk_rows:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk
    except Exception as e:  # noqa: BLE001 - an unreadable manifest file is a reject, not a crash
        row = {READ_ERROR: f"{uri}: {describe_error(e)}"[:500], READ_REASON: R.UNREADABLE_MANIFEST.value, SOURCE: uri}
        yield [(line, offset, row)]


def iter_manifest_rows(uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None,
                       chunk_rows: int = 2048) -> Iterator[list[dict[str, Any]]]:
    """Chunks of raw rows of one manifest file, in file order (`iter_manifest_records` without positions)."""
    for chunk in iter_manifest_records(uri, storage_options, chunk_rows=chunk_rows):
        yield [row for _, _, row in chunk]


def _iter_json_rows(f, uri: str, first_line: int = 1, first_offset: int = 0) -> Iterator[Record]:
    offset = first_offset
    for number, line in enumerate(f, start=first_line):
        at, offset = offset, offset + len(line)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as e:  # invalid JSON, and invalid UTF-8 (UnicodeDecodeError is a ValueError)
            row = _bad_row(uri, f"line {number}", e)
        yield number, at, row


def read_manifest_files(batch: pa.Table, config: InputConfig, storage_options, bases: Mapping[str, str]):
    """Ray Data generator UDF: one row per manifest file in, INPUT_SCHEMA batches out."""
    for uri, index in zip(batch.column("uri").to_pylist(), batch.column("index").to_pylist()):
        row = 0
        for chunk in iter_manifest_rows(uri, storage_options):
            ordinals = [(index << ORDINAL_FILE_SHIFT) + row + k for k in range(len(chunk))]
            row += len(chunk)
            yield normalize_rows(chunk, ordinals, config, bases[uri])


def _chunks(rows: Iterator[dict[str, Any]], chunk_rows: int) -> Iterator[pa.Table]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= chunk_rows:
            yield pa.Table.from_pylist(chunk, schema=INPUT_SCHEMA)
            chunk = []
    if chunk:
        yield pa.Table.from_pylist(chunk, schema=INPUT_SCHEMA)


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
        yield from _chunks(rows, chunk_rows)


def _reject_row(image_id: str, uri: str | None, ordinal: int, reason: str, message: str,
                alt_text: str | None = None) -> dict[str, Any]:
    return {"image_id": image_id, "image_uri": uri, "image_bytes": None, "alt_text": alt_text, "ordinal": ordinal,
            REJECT_STAGE: READ_STAGE, REJECT_REASON: reason, REJECT_MESSAGE: message[:500]}


def read_status_table(uri: str, config: InputConfig, storage_options) -> list[dict[str, Any]]:
    """img2dataset's per-shard status table (key, url, caption, status, error), in file order, without
    its image bytes (the parquet layout's `jpg` column is read by the manifest reader instead)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = ("key", "url", "caption", config.status_column, config.error_column)
        return pf.read(columns=[c for c in columns if c in pf.schema_arrow.names]).to_pylist()


def _status_rows(status_uri: str, base: int, config: InputConfig,
                 storage_options) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the status table's rows, []), or ([], [one reject]) when the table cannot be read."""
    try:
        return read_status_table(status_uri, config, storage_options), []
    except Exception as e:  # noqa: BLE001 - an unreadable status table is a reject, not a crash
        return [], [_reject_row(derive_image_id(status_uri, None), status_uri, base + (1 << ORDINAL_FILE_SHIFT) - 1,
                                R.UNREADABLE_MANIFEST.value, f"{status_uri}: {describe_error(e)}")]


def _by_key(rows: list[dict[str, Any]]) -> dict[str | None, tuple[int, dict[str, Any]]]:
    return {_text(r.get("key")): (k, r) for k, r in enumerate(rows)}


def _status_rejects(rows: list[dict[str, Any]], seen: set[str], base: int, config: InputConfig, where: str):
    """The status table's rows that did not become inputs: img2dataset's failures (its status as the
    reason, its error as the message), and successes whose image is not in the shard."""
    for k, row in enumerate(rows):
        key = _text(row.get("key")) or ""
        if key in seen:
            continue
        message, reason = upstream_failure(row.get(config.status_column), row.get(config.error_column))
        if message is None:
            reason = R.MISSING_IMAGE.value
            message = f"img2dataset recorded key {key!r} as a success, but {where} has no image for it"
        yield _reject_row(key or derive_image_id(f"{where}#{k}", None), _text(row.get("url")), base + k, reason,
                          message, _text(row.get("caption")))


def iter_img2dataset_tar(tar_uri: str, status_uri: str, base: int, config: InputConfig,
                         storage_options) -> Iterator[dict[str, Any]]:
    """Rows of one img2dataset webdataset shard: its tar's samples (ordinal: the key's position in the
    status table), then one reject per status row without a sample (failures keep img2dataset's error)."""
    rows, unreadable = _status_rows(status_uri, base, config, storage_options)
    yield from unreadable
    by_key = _by_key(rows)
    seen: set[str] = set()
    extra = len(rows)
    for sample in iter_webdataset(tar_uri, storage_options):
        key = sample["image_id"]
        if key in by_key and key not in seen:
            position = by_key[key][0]
        else:
            position, extra = extra, extra + 1
        seen.add(key)
        yield {**sample, "ordinal": base + position}
    yield from _status_rejects(rows, seen, base, config, tar_uri)


def read_folder_files(batch: pa.Table, config: InputConfig, storage_options, chunk_rows: int = 256):
    """Ray Data generator UDF for image folders. A row with `status` is one img2dataset shard of the
    files layout (NNNNN.parquet + NNNNN/); any other row is one image with its .txt/.json sidecars."""
    units = batch.to_pylist()
    images = [u for u in units if not u.get("status")]
    if images:
        yield from _chunks((_folder_row(u, config, storage_options) for u in images), chunk_rows)
    for unit in units:
        if unit.get("status"):
            yield from _chunks(iter_img2dataset_files(unit, config, storage_options), chunk_rows)


def _read_sidecar(uri: str | None, storage_options) -> bytes | None:
    if not uri:
        return None
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        return f.read(1 << 20)  # a caption, not a payload


def _folder_row(unit: Mapping[str, Any], config: InputConfig, storage_options) -> dict[str, Any]:
    """One image of a folder: its .txt beside it is the alt-text, its .json's key/url/caption (as
    img2dataset's files layout writes them) the id, source URL and alt-text when present."""
    uri = unit["uri"]
    row = {"image_id": None, "image_uri": uri, "image_bytes": None, "alt_text": None, "ordinal": unit["index"],
           REJECT_STAGE: None, REJECT_REASON: None, REJECT_MESSAGE: None}
    try:
        meta = json.loads(_read_sidecar(unit.get("json"), storage_options) or b"{}")
        meta = meta if isinstance(meta, dict) else {}
        text = _read_sidecar(unit.get("txt"), storage_options)
    except Exception as e:  # noqa: BLE001 - a broken sidecar is that image's reject, not a crash
        return {**row, "image_id": derive_image_id(uri, None), REJECT_STAGE: READ_STAGE,
                REJECT_REASON: R.BAD_SIDECAR.value,
                REJECT_MESSAGE: f"{unit.get('json') or unit.get('txt')}: {describe_error(e)}"[:500]}
    id_key = _first(config.id_column, list(meta))
    key = _text(meta.get(id_key)) if id_key else None
    row["image_id"] = (key or "").strip() or derive_image_id(uri, None)
    row["alt_text"] = text.decode("utf-8", errors="replace") if text is not None else _text(meta.get("caption"))
    return row


def iter_img2dataset_files(unit: Mapping[str, Any], config: InputConfig, storage_options) -> Iterator[dict[str, Any]]:
    """Rows of one shard of img2dataset's files layout: NNNNN.parquet (the status table: key, url,
    caption, status) and NNNNN/KEY.jpg. Successes point at their image file (alt-text from the table,
    the same text as KEY.txt, without a read per image); failures and missing files are rejects;
    images the table does not list are read with their sidecars."""
    base = unit["index"] << ORDINAL_FILE_SHIFT
    rows, unreadable = _status_rows(unit["status"], base, config, storage_options)
    yield from unreadable
    by_key = _by_key(rows)
    fs, folder = filesystem(unit["folder"], storage_options)
    prefix = uri_prefix(unit["folder"])
    listing = sorted(fs.find(folder)) if fs.exists(folder) else []
    by_stem: dict[str, dict[str, str]] = {}
    for path in listing:
        stem, suffix = posixpath.splitext(posixpath.basename(path))
        by_stem.setdefault(stem, {})[suffix.lower()] = prefix + path
    exts = tuple(e.lower() for e in config.image_extensions)
    seen: set[str] = set()
    for key, (position, row) in by_key.items():
        files = by_stem.get(key or "", {})
        image = next((files[e] for e in exts if e in files), None)
        if image is None or upstream_failure(row.get(config.status_column), row.get(config.error_column))[0]:
            continue  # a reject below
        seen.add(key)
        out = {"image_id": key, "image_uri": _text(row.get("url")) or image, "image_bytes": None,
               "alt_text": _text(row.get("caption")), "ordinal": base + position,
               REJECT_STAGE: None, REJECT_REASON: None, REJECT_MESSAGE: None}
        try:  # read here, like the tar and parquet layouts, so image_uri can keep the source URL
            fs_image, image_path = filesystem(image, storage_options)
            with fs_image.open(image_path, "rb") as f:
                out["image_bytes"] = f.read()
        except Exception as e:  # noqa: BLE001 - one unreadable file is that image's reject
            out.update({REJECT_STAGE: READ_STAGE, REJECT_REASON: R.UNREADABLE_FILE.value,
                        REJECT_MESSAGE: f"{image}: {describe_error(e)}"[:500]})
        yield out
    extra = len(rows)
    for stem, files in by_stem.items():
        image = next((files[e] for e in exts if e in files), None)
        if image is None or stem in by_key:
            continue
        yield _folder_row({"uri": image, "txt": files.get(".txt"), "json": files.get(".json"), "index": base + extra},
                          config, storage_options)
        extra += 1
    yield from _status_rejects(rows, seen, base, config, unit["folder"])


def _webdataset_row(tar_uri: str, key: str, parts: Mapping[str, bytes],
                    image_suffixes: tuple[str, ...]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
    image_suffix = next((s.lstrip(".") for s in image_suffixes if s.lstrip(".") in parts), None)
    alt = parts["txt"].decode("utf-8", errors="replace") if "txt" in parts else _text(meta.get("caption"))
    row = {"image_id": _text(meta.get("key")) or posixpath.basename(key),
           "image_uri": _text(meta.get("url")) or f"{tar_uri}#{key}.{image_suffix or 'jpg'}",
           "image_bytes": parts.get(image_suffix) if image_suffix else None, "alt_text": alt,
           REJECT_STAGE: None, REJECT_REASON: None, REJECT_MESSAGE: None}
    if image_suffix is None:
        row.update({REJECT_STAGE: READ_STAGE, REJECT_REASON: R.MISSING_IMAGE.value,
                    REJECT_MESSAGE: f"sample {key!r} in {tar_uri} has no image member"})
    return row


def iter_webdataset(tar_uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None,
                    image_suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Iterator[dict[str, Any]]:
    """Rows of an img2dataset tar: KEY.jpg (or another image suffix) + KEY.txt + KEY.json.

    The tar is streamed, one sample at a time (a sample's members are consecutive, as img2dataset
    and webdataset write them). A key with no image becomes a 'missing_image' reject. A tar that
    breaks off becomes an 'unreadable_shard' reject for the shard, and one for the sample it broke in."""
    key, parts = None, {}
    try:
        fs, path = filesystem(tar_uri, storage_options)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                name_key, _, suffix = member.name.rpartition(".")
                if not member.isfile() or not name_key:
                    continue
                if name_key != key:
                    if key is not None:
                        yield _webdataset_row(tar_uri, key, parts, image_suffixes)
                    key, parts = name_key, {}
                parts[suffix.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield _webdataset_row(tar_uri, key, parts, image_suffixes)
    except Exception as e:  # noqa: BLE001 - an unreadable shard is a reject, not a crash
        message = describe_error(e)[:500]
        if key is not None:
            row = _webdataset_row(tar_uri, key, parts, image_suffixes)
            row.update({REJECT_STAGE: READ_STAGE, REJECT_REASON: R.UNREADABLE_SHARD.value,
                        REJECT_MESSAGE: f"{tar_uri} broke off in this sample: {message}"})
            yield row
        yield {"image_id": derive_image_id(tar_uri, None), "image_uri": tar_uri, "image_bytes": None,
               "alt_text": None, REJECT_STAGE: READ_STAGE, REJECT_REASON: R.UNREADABLE_SHARD.value,
               REJECT_MESSAGE: message}


class EmptyInputError(ValueError):
    """The input yields no inputs at all (and input.allow_empty is off)."""


@dataclass
class InputPlan:
    """How an input is read: KIND (manifest | webdataset | folder) and the UNITS one reading task
    each takes (a manifest file, a tar, an image, an img2dataset shard), plus what the listing held."""

    uri: str
    kind: str
    units: list[dict[str, Any]]
    img2dataset: bool = False
    found: dict[str, int] = field(default_factory=dict)  # suffix (or "folder") -> count in the listing

    @property
    def label(self) -> str:
        """The kind, with img2dataset's name for its layout: 'webdataset (img2dataset webdataset)'."""
        if not self.img2dataset:
            return self.kind
        return f"{self.kind} (img2dataset {IMG2DATASET_LAYOUTS[self.kind]} layout)"

    def holds(self) -> str:
        return ", ".join(f"{n} {s}" for s, n in self.found.items()) or "nothing"


def _suffix(path: str) -> str:
    return posixpath.splitext(path)[1].lower() or "(no suffix)"


STATS_SUFFIX = "_stats.json"  # img2dataset's per-shard summary, beside NNNNN.parquet
IMG2DATASET_LAYOUTS = {"webdataset": "webdataset", "manifest": "parquet", "folder": "files"}  # its output_format


def plan_input(uri: str, config: InputConfig, storage_options: Mapping[str, Mapping[str, Any]] | None) -> InputPlan:
    """List INPUT once and decide how to read it (see InputConfig.format). Raises FileNotFoundError for
    a missing input, ValueError for one that cannot be read as asked, and EmptyInputError when there
    is nothing to read (unless input.allow_empty)."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"input {uri} does not exist")
    prefix = uri_prefix(uri)
    forced = config.format
    if not fs.isdir(path):
        return _plan_file(uri, prefix + path, forced)
    root = path.rstrip("/")
    listing = sorted(f for f in fs.find(root) if not any(
        part.startswith((".", "_")) for part in f[len(root):].split("/") if part))
    top = [f for f in listing if posixpath.dirname(f) == root]
    subdirs = sorted({f[len(root) + 1:].split("/", 1)[0] for f in listing if posixpath.dirname(f) != root})
    found = dict(sorted(_count(_suffix(f) for f in listing).items()))
    if subdirs:
        found["folders"] = len(subdirs)
    names = {posixpath.basename(f) for f in top}
    stems = sorted({n[: -len(STATS_SUFFIX)] for n in names if n.endswith(STATS_SUFFIX)}
                   | {posixpath.splitext(n)[0] for n in names if n.endswith(".parquet")
                      and (posixpath.splitext(n)[0] + ".tar" in names or posixpath.splitext(n)[0] in subdirs)})
    img2dataset = any(f"{s}.parquet" in names for s in stems)
    tars = [f for f in top if f.endswith(".tar")] if img2dataset else [f for f in listing if f.endswith(".tar")]
    manifests = [f for f in listing
                 if _suffix(f) in MANIFEST_SUFFIXES and not (img2dataset and f.endswith(STATS_SUFFIX))]
    exts = tuple(e.lower() for e in config.image_extensions)
    kind = forced
    if forced == "auto":
        if img2dataset:
            kind = "webdataset" if tars else "folder" if any(s in subdirs for s in stems) else "manifest"
        else:
            suffixes = {_suffix(f) for f in listing}
            kind = ("webdataset" if suffixes and suffixes <= {".tar"}
                    else "manifest" if suffixes and suffixes <= set(MANIFEST_SUFFIXES) else "folder")
    plan = InputPlan(uri, kind, [], img2dataset=img2dataset, found=found)
    if kind == "webdataset":
        status = {f"{root}/{s}.tar": f"{root}/{s}.parquet" for s in stems if f"{s}.parquet" in names}
        plan.units = [{"uri": prefix + t, "index": i, "status": prefix + status[t] if t in status else None}
                      for i, t in enumerate(tars)]
    elif kind == "manifest":
        formats = {MANIFEST_SUFFIXES[_suffix(f)] for f in manifests}
        if len(formats) > 1:
            raise ValueError(f"input {uri} mixes manifest formats {sorted({_suffix(f) for f in manifests})}: use one")
        plan.units = [{"uri": prefix + f, "index": i} for i, f in enumerate(manifests)]
    else:
        shard_dirs = {s for s in stems if s in subdirs and f"{s}.parquet" in names}
        plan.units = _folder_units(root, prefix, listing, exts, shard_dirs)
    if not plan.units and not config.allow_empty:
        wanted = {"webdataset": ".tar files", "manifest": f"manifest files ({', '.join(sorted(MANIFEST_SUFFIXES))})",
                  "folder": f"image files ({', '.join(exts)})"}[kind]
        raise EmptyInputError(f"input {uri} yields no inputs: read as {plan.label}, it has no {wanted}; it holds "
                              f"{plan.holds()}. Set input.format to read it another way, or input.allow_empty=true "
                              "to accept an empty input")
    return plan


def _plan_file(uri: str, file_uri: str, forced: str) -> InputPlan:
    """The plan of an INPUT that is one file: a manifest or a WebDataset tar, told by its suffix."""
    suffix = _suffix(file_uri)
    kind = "webdataset" if suffix == ".tar" else "manifest" if suffix in MANIFEST_SUFFIXES else None
    if kind is None and forced == "auto":
        raise ValueError(f"input {uri}: cannot tell its format from the suffix; expected one of "
                         f"{sorted(MANIFEST_SUFFIXES)} or .tar, or a folder")
    if forced not in ("auto", kind):
        raise ValueError(f"input {uri} is one {suffix} file; input.format={forced} needs "
                         + ("a folder" if forced == "folder" else "a .tar" if forced == "webdataset"
                            else f"one of {sorted(MANIFEST_SUFFIXES)}"))
    return InputPlan(uri, kind, [{"uri": file_uri, "index": 0}], found={suffix: 1})


def _folder_units(root: str, prefix: str, listing: list[str], exts: tuple[str, ...],
                  shard_dirs: set[str]) -> list[dict[str, Any]]:
    """The units of a folder input: each image with the .txt / .json beside it when the listing has
    them, then each img2dataset files-layout shard (status table + folder)."""
    files_by_stem: dict[str, set[str]] = {}
    for f in listing:
        files_by_stem.setdefault(posixpath.splitext(f)[0], set()).add(_suffix(f))
    images = [f for f in listing if f.lower().endswith(exts) and f[len(root) + 1:].split("/", 1)[0] not in shard_dirs]
    units = []
    for i, f in enumerate(images):
        stem = posixpath.splitext(f)[0]
        sidecars = {side: prefix + f"{stem}.{side}" if f".{side}" in files_by_stem[stem] else None
                    for side in ("txt", "json")}
        units.append({"uri": prefix + f, "index": i, **sidecars})
    for k, s in enumerate(sorted(shard_dirs)):
        status = prefix + f"{root}/{s}.parquet"
        units.append({"uri": status, "index": len(images) + k, "status": status, "folder": prefix + f"{root}/{s}"})
    return units


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def read_inputs(uri: str, config: InputConfig, storage_options: Mapping[str, Mapping[str, Any]] | None,
                num_cpus: float = 1.0):
    """A Ray Dataset of INPUT_SCHEMA rows for URI, and its InputPlan; NUM_CPUS per reading task.
    (Ray is imported here.)"""
    import ray.data

    plan = plan_input(uri, config, storage_options)
    if not plan.units:  # allowed empty: an empty dataset of the input schema
        return ray.data.from_arrow(INPUT_SCHEMA.empty_table()), plan
    units = ray.data.from_items(plan.units, override_num_blocks=max(1, min(len(plan.units), 256)))
    common = dict(batch_format="pyarrow", num_cpus=num_cpus)
    if plan.kind == "manifest":
        bases = {u["uri"]: parent_uri(u["uri"]) for u in plan.units}
        ds = units.map_batches(read_manifest_files, batch_size=1, **common,
                               fn_kwargs={"config": config, "storage_options": storage_options, "bases": bases})
    elif plan.kind == "webdataset":
        ds = units.map_batches(read_webdataset_files, batch_size=1, **common,
                               fn_kwargs={"config": config, "storage_options": storage_options})
    else:
        ds = units.map_batches(read_folder_files, batch_size=config.block_rows, **common,
                               fn_kwargs={"config": config, "storage_options": storage_options})
    if config.limit:
        ds = ds.limit(config.limit)
    return ds, plan
