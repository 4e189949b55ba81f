"""The text files transfer and classify read: texts (and labelled rows) streamed in, a row at a time.

Both CLIs read the same kinds of file (CSV with a header, JSON lines, or one text per line; plain or
.gz; any encoding) and report a bad one in one line naming the file and line, so that reading lives
here, a floor below both (a CLI never imports another). A file is read a block at a time and
decoded incrementally, so what is in memory is one block and the line being read, whatever the
file's size: a reader that needs the texts again reads the file again.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import itertools
import json
import os
import re
import zlib
from collections.abc import Iterator

BLOCK = 1 << 20  # bytes read (and decoded) at a time
_CSV_LINE_END = re.compile(r"(\r\n|\r|\n)")  # where csv's newline="" reading ends a line


class InputError(ValueError):
    """A file that cannot be used, explained in one line naming it (and the line where it applies)."""


def _blocks(path: str) -> Iterator[bytes]:
    """The bytes of a (optionally gzipped) file, BLOCK at a time; a file that cannot be read is one line."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a file")
    try:
        f = (gzip.open if path.endswith(".gz") else open)(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        while True:
            try:
                block = f.read(BLOCK)
            except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, damaged
                raise InputError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
            if not block:
                return
            yield block


def _split(text: str, csv_line_ends: bool) -> tuple[list[str], str]:
    """(the complete lines of TEXT, each with its line end; the rest after the last line end)."""
    if csv_line_ends:
        parts = _CSV_LINE_END.split(text)
        return [a + b for a, b in zip(parts[0:-1:2], parts[1::2])], parts[-1]
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]], parts[-1]


def lines(path: str, encoding: str, csv_line_ends: bool = False) -> Iterator[str]:
    """The decoded lines of a file, each with its line end (the last one may have none).

    Lines end at "\\n", or with csv_line_ends at "\\r\\n", "\\r" or "\\n" as csv reads them. A byte
    that does not decode is an InputError naming the file and line.
    """
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        raise InputError(f"unknown encoding {encoding!r}") from None
    done, pending = 0, []  # lines yielded; pieces of the line being read
    ends = ("\r", "\n") if csv_line_ends else ("\n",)
    for block in itertools.chain(_blocks(path), [b""]):  # b"": the end, where the decoder flushes
        final = not block
        try:
            text = decoder.decode(block, final=final)
        except UnicodeDecodeError as e:
            line = done + 1 + e.object[:e.start].count(b"\n")
            raise InputError(f"{path}:{line}: not valid {encoding} (byte 0x{e.object[e.start]:02x}); "
                             f"pass --encoding, for example latin-1") from None
        if not final and not any(end in text for end in ends):
            pending.append(text)  # no line ends here: a long line is joined once, not once per block
            continue
        text = "".join(pending) + text
        held = ""
        if csv_line_ends and not final and text.endswith("\r"):  # may be the first half of "\r\n"
            text, held = text[:-1], "\r"
        complete, rest = _split(text, csv_line_ends)
        yield from complete
        done += len(complete)
        pending = [rest + held]
    if pending and pending[0]:
        yield pending[0]


def csv_rows(path: str, columns: list[str], encoding: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, [value of each column]) for every row of a CSV with a header, as it is read.

    A row with fewer or more fields than the header is an error, not a guess; a blank line is not a row.
    """
    reader = csv.reader(lines(path, encoding, csv_line_ends=True))
    try:
        header = next(reader, None)
        missing = [c for c in columns if c not in (header or [])]
        if missing:
            raise InputError(f"{path}:1: no column {', '.join(map(repr, missing))} "
                             f"(columns: {', '.join(header or []) or 'none'})")
        where = [header.index(c) for c in columns]
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise InputError(f"{path}:{reader.line_num}: row has {len(row)} fields, the header has "
                                 f"{len(header)}")
            yield reader.line_num, [row[i] for i in where]
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def json_field(path: str, field: str, encoding: str) -> Iterator[str]:
    """The string FIELD of every non-blank line of a JSON-lines file, as it is read."""
    for number, line in enumerate(lines(path, encoding), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{number}: not valid JSON") from None
        except RecursionError:  # e.g. [[[[... thousands deep: the parser recurses once per level
            raise InputError(f"{path}:{number}: JSON nested too deeply to read") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise InputError(f"{path}:{number}: no text field {field!r}")
        yield record[field]


def texts(path: str, text_column: str = "", text_field: str = "", encoding: str = "utf-8-sig") -> Iterator[str]:
    """Every text of a CSV (text_column), JSON-lines (text_field) or plain one-per-line file, as it is read.

    The flags are checked now; the file as it is read (a file without a text fails at its end).
    """
    if text_column and text_field:
        raise InputError("give --text_column (CSV) or --text_field (JSON lines), not both")
    name = path[:-3] if path.endswith(".gz") else path
    if not (text_column or text_field) and name.endswith((".csv", ".jsonl", ".json")):
        raise InputError(f"{path}: looks like CSV or JSON lines; name the text with --text_column or --text_field")
    if text_column:
        found = (values[0] for _, values in csv_rows(path, [text_column], encoding))
    elif text_field:
        found = json_field(path, text_field, encoding)
    else:
        found = (line[:-1].rstrip("\r") if line.endswith("\n") else line.rstrip("\r")
                 for line in lines(path, encoding))
    return _at_least_one(found, path)


def _at_least_one(found: Iterator[str], path: str) -> Iterator[str]:
    empty = True
    for text in found:
        empty = False
        yield text
    if empty:
        raise InputError(f"{path}: no texts")
