"""The files transfer and classify read and write: texts (and labelled rows) in, a checked output path out.

Both CLIs read the same kinds of file (CSV with a header, JSON lines, or one text per line; plain or
.gz; any encoding) and report a bad one in one line naming the file and line, so that reading lives
here, a floor below both (a CLI never imports another).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zlib


class InputError(ValueError):
    """A file that cannot be used, explained in one line naming it (and the line where it applies)."""


def read_decoded(path: str, encoding: str) -> str:
    """A whole (optionally gzipped) file as text; a decode error names the file and line."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a file")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        return raw.decode(encoding)
    except LookupError:
        raise InputError(f"unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid {encoding} (byte 0x{raw[e.start]:02x}); "
                         f"pass --encoding, for example latin-1") from None


def read_csv_columns(path: str, columns: list[str], encoding: str) -> list[tuple[int, list[str]]]:
    """(line number, [value of each column]) for every row of a CSV with a header.

    A row with fewer or more fields than the header is an error, not a guess.
    """
    reader = csv.reader(io.StringIO(read_decoded(path, encoding), newline=""))
    try:
        header = next(reader, None)
        missing = [c for c in columns if c not in (header or [])]
        if missing:
            raise InputError(f"{path}:1: no column {', '.join(map(repr, missing))} "
                             f"(columns: {', '.join(header or []) or 'none'})")
        where = [header.index(c) for c in columns]
        rows = []
        for row in reader:
            if not row:  # a blank line is not a record
                continue
            if len(row) != len(header):
                raise InputError(f"{path}:{reader.line_num}: row has {len(row)} fields, the header has "
                                 f"{len(header)}")
            rows.append((reader.line_num, [row[i] for i in where]))
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


def read_texts(path: str, text_column: str = "", text_field: str = "", encoding: str = "utf-8-sig") -> list[str]:
    """Every text of a CSV (text_column), JSON-lines (text_field) or plain one-per-line file."""
    if text_column and text_field:
        raise InputError("give --text_column (CSV) or --text_field (JSON lines), not both")
    name = path[:-3] if path.endswith(".gz") else path
    if text_column:
        texts = [values[0] for _, values in read_csv_columns(path, [text_column], encoding)]
    elif text_field:
        texts = []
        for number, line in enumerate(read_decoded(path, encoding).split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path}:{number}: not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise InputError(f"{path}:{number}: no text field {text_field!r}")
            texts.append(record[text_field])
    elif name.endswith((".csv", ".jsonl", ".json")):
        raise InputError(f"{path}: looks like CSV or JSON lines; name the text with --text_column or --text_field")
    else:
        texts = [line.rstrip("\r") for line in read_decoded(path, encoding).split("\n")]
        if texts[-1] == "":  # after the last newline (or an empty file)
            texts.pop()
    if not texts:
        raise InputError(f"{path}: no texts")
    return texts


def check_writable(path: str) -> None:
    """Before any work: the output's directory exists and can be written, and PATH is not a directory."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory")
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise InputError(f"{path}: cannot write there ({directory} is not a writable directory)")
