"""Manifest files (Parquet, JSONL, CSV) as records, in file order, from any record on: a row that
cannot be read becomes an error row naming its line, and reading goes on."""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterator, Mapping
from typing import Any

from schemas.rejects import RejectReason as R
from vesl.annotate.sources.rows import READ_ERROR, READ_REASON, SOURCE, bad_row
from vesl.core.storage import filesystem, open_regular
from vesl.core.text import describe_error

MANIFEST_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


CSV_MAX_RECORD_LINES = 64  # a quoted CSV field may span lines; an open quote longer than this is a broken row


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
            return bad_row(self.uri, f"line {lineno}", problem)
        if len(fields) != len(self.header):
            return bad_row(self.uri, f"line {lineno}", f"{len(fields)} fields, the header has {len(self.header)}")
        return {k: (v if v != "" else None) for k, v in zip(self.header, fields)}

    def bad(self, problem: str) -> Record:
        """The first pending line as an error row (its record cannot be read), dropped from PENDING."""
        lineno, offset, _ = self.pending.pop(0)
        if self.header is None:
            raise ValueError(f"header line: {problem}")
        return lineno, offset, bad_row(self.uri, f"line {lineno}", f"bad CSV: {problem}")

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
            yield [(first + k, first + k, bad_row(uri, f"row {k}", message)) for k in range(skip, n)]
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
                        rows.append(bad_row(uri, f"row group {group} row {at - first + lo + k}", describe_error(e)))
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
        with open_regular(fs, path) as f:
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
            row = bad_row(uri, f"line {number}", e)
        yield number, at, row
