"""The input formats: which one a file is, and the texts of the records in a byte stream of it.

amazon_json is McAuley's review dumps, one review per line (strict JSON, or the older files'
Python dict literals); csv has a header and RFC 4180 quoting (a row may span lines); text is one
document per line, or the whole stream with --text_whole_file. Lines are read with a length
limit, so no line is ever held whole beyond --max_record_bytes.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import itertools
import json
import tokenize

from horovod_mlstm.preprocess.settings import MB, Options, PreprocessError

MAX_LITERAL_TOKENS = 10_000  # a Python-literal line with more is not a review (and would cost ~1 KB a token)


class LineError(Exception):
    """A fatal problem at a line of a stream, numbered from the stream's first line."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line, self.message = line, message


def read_lines(stream, limit: int, stop: int | None = None):
    """The lines of a binary stream (up to byte `stop`), None for each longer than `limit` (read past, not held)."""
    position = 0
    while stop is None or position < stop:
        line = stream.readline(limit + 1)
        if not line:
            return
        position += len(line)
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = stream.readline(MB)
                position += len(line)
            yield None
        else:
            yield line


def too_long(opts: Options) -> str:
    return f"longer than --max_record_bytes={opts.max_record_bytes}"


def parse_review(line: str, text_field: str) -> tuple[str | None, str | None]:
    """(text, None) of one McAuley review line ("summary. reviewText"), or (None, why it has none)."""
    try:
        review = json.loads(line)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nested deeper than the interpreter's limit
        review = _python_literal(line)  # the older dumps are Python dict literals, one per line
        if review is None:
            return None, "malformed JSON"
    if not isinstance(review, dict):
        return None, "not a JSON object"
    if text_field not in review:
        return None, f"no '{text_field}' field"
    if not isinstance(review[text_field], str):
        return None, f"'{text_field}' is not a string"
    summary = review.get("summary")
    text = f"{summary}. {review[text_field]}" if isinstance(summary, str) and summary.strip() else review[text_field]
    return text, None


def _python_literal(line: str):
    """The value of a Python literal line, or None when it is not one or has more than MAX_LITERAL_TOKENS tokens.

    ast.literal_eval holds a syntax tree of about 1 KB per token (a 1 MB line of `1, 1, ...` took
    476 MB), so a line is first counted, token by token, without building anything; a review of the
    older dumps has about 30 tokens, whatever the length of its text.
    """
    try:
        tokens = tokenize.generate_tokens(iter((line,)).__next__)  # not StringIO: it holds 4 bytes a character
        if next(itertools.islice(tokens, MAX_LITERAL_TOKENS, None), None) is not None:
            return None
        return ast.literal_eval(line)
    except (tokenize.TokenError, ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _csv_rows(lines, header: tuple[str, ...], opts: Options):
    """(line, text, reason) per CSV row; a line over the limit or a CSV error is fatal (rows can span lines)."""
    column = header.index(opts.csv_column)
    counted = [0]

    def decoded():
        for line in lines:
            counted[0] += 1
            if line is None:
                raise LineError(counted[0], f"a line {too_long(opts)} (raise it, or check the file is CSV)")
            yield line.decode("utf-8", "surrogateescape")

    reader = csv.reader(decoded())
    try:
        for row in reader:
            if row:
                text = row[column] if len(row) > column else None
                yield reader.line_num, text, None if text is not None else "short CSV row"
    except csv.Error as e:
        raise LineError(reader.line_num, f"malformed CSV ({e})") from None


def texts(stream, fmt: str, opts: Options, stop: int | None = None, header: tuple[str, ...] = ()):
    """(line within the stream, text or None, why None) for every record of a stream (up to byte `stop`)."""
    if fmt == "text" and opts.text_whole_file:
        yield 1, stream.read().decode("utf-8", "surrogateescape"), None  # size checked when planned/read
        return
    lines = read_lines(stream, opts.max_record_bytes, stop)
    if fmt == "csv":
        yield from _csv_rows(lines, header, opts)
        return
    for number, line in enumerate(lines, 1):
        if line is None:
            yield number, None, too_long(opts)
            continue
        line = line.decode("utf-8", "surrogateescape")
        if not line.strip():
            continue
        if fmt == "text":
            yield number, line, None
        else:
            yield (number, *parse_review(line, opts.text_field))


def open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb", buffering=MB)


def detect_format(path: str) -> str:
    """amazon_json, csv or text, from the file name and its first non-empty line."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".csv"):
        return "csv"
    with open_binary(path) as f:
        head = f.read(64 * 1024).lstrip()
    return "amazon_json" if head.startswith(b"{") else "text"


def csv_header(stream, path: str, opts: Options) -> tuple[tuple[str, ...], int, int]:
    """(column names, bytes and lines they take): the first record, which may span lines in quotes."""
    lines, quotes = [], 0
    for line in read_lines(stream, opts.max_record_bytes):
        if line is None:
            raise PreprocessError(f"{path}:{len(lines) + 1}: a header line {too_long(opts)}")
        lines.append(line)
        quotes += line.count(b'"')
        if quotes % 2 == 0:
            break
    header = b"".join(lines)
    fields = next(csv.reader(io.StringIO(header.decode("utf-8", "surrogateescape").lstrip("\ufeff"))), [])
    if opts.csv_column not in fields:
        raise PreprocessError(f"{path}:1: no column {opts.csv_column!r} (columns: {', '.join(fields)})")
    return tuple(fields), len(header), len(lines)
