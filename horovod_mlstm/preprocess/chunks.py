"""Cutting the inputs into chunks of about --chunk_mb that end on record boundaries, and reading them.

A plain file is cut into byte ranges before any work starts: each cut is the first line end (in
CSV: outside quotes) after chunk_bytes from the previous one. A gzip file cannot be seeked, so one
reader decompresses it and cuts it the same way as it goes, handing over pieces of whole lines.
Boundaries depend on the input and --chunk_mb only, so ranks sharing a file agree on its chunks
without talking, and rank_chunks deals them out.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import zlib

from absl import logging

from horovod_mlstm.preprocess.formats import LineError, csv_header, detect_format, open_binary, read_lines, texts, \
    too_long
from horovod_mlstm.preprocess.settings import MB, Options, PreprocessError


@dataclasses.dataclass
class Chunk:
    """One unit of work: a byte range of a plain file, or whole lines handed over by a gzip reader."""

    file: int  # index of the input file
    index: int  # position within the file
    path: str
    fmt: str
    span: int  # input bytes it stands for (compressed bytes for gzip), for the progress bar
    start: int = 0  # plain file: bytes [start, stop), beginning and ending on record boundaries
    stop: int = 0
    data: bytes | None = None  # gzip: the lines themselves
    first_line: int | None = None  # gzip: the line number of the first line (plain: found on an error)
    overlong: int = 0  # gzip: lines the reader dropped for exceeding --max_record_bytes
    header: tuple[str, ...] = ()  # csv: the column names


@dataclasses.dataclass
class FilePlan:
    """One input file: its format, size and, for a plain file, its chunks."""

    index: int
    path: str
    fmt: str
    size: int
    gzip: bool
    header: tuple[str, ...] = ()
    chunks: list[Chunk] = dataclasses.field(default_factory=list)  # plain files only


# ---------------------------------------------------------------- reading a chunk

def chunk_texts(chunk: Chunk, opts: Options):
    """(line, text or None, why None) for every record of a chunk; PreprocessError naming FILE:LINE when fatal."""
    if chunk.data is not None:
        stream, stop = io.BytesIO(chunk.data), None
    else:
        stream, stop = open(chunk.path, "rb", buffering=MB), chunk.stop - chunk.start
        stream.seek(chunk.start)
    try:
        with stream:
            for _ in range(chunk.overlong):
                yield 0, None, too_long(opts)
            yield from texts(stream, chunk.fmt, opts, stop, chunk.header)
    except LineError as e:
        first = chunk.first_line or _line_number(chunk.path, chunk.start)
        raise PreprocessError(f"{chunk.path}:{first + e.line - 1}: {e.message}") from None
    except OSError as e:
        raise PreprocessError(f"{chunk.path}: cannot read ({e.strerror or e})") from None


def _line_number(path: str, offset: int) -> int:
    """The line number at byte `offset` of a plain file (read only when an error needs it)."""
    count = 1
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 16 * MB))
            if not block:
                break
            count += block.count(b"\n")
            offset -= len(block)
    return count


# ---------------------------------------------------------------- planning: inputs -> chunks

def check_input(path: str) -> None:
    if os.path.isdir(path):
        raise PreprocessError(f"{path}: is a directory (give the files in it, e.g. {path.rstrip('/')}/*.json.gz)")
    try:
        open(path, "rb").close()
    except FileNotFoundError:
        raise PreprocessError(f"{path}: no such file") from None
    except OSError as e:
        raise PreprocessError(f"{path}: cannot read ({e.strerror})") from None


def plan_inputs(inputs: list[str], fmt: str, opts: Options) -> list[FilePlan]:
    """Checks every input and cuts the plain ones into chunks (gzip files are cut while they are read)."""
    if not inputs:
        raise PreprocessError("no input files given (--input)")
    seen = {}  # (device, inode) -> the first name given for that file
    for path in inputs:
        check_input(path)
        stat = os.stat(path)
        first = seen.setdefault((stat.st_dev, stat.st_ino), path)
        if first != path or inputs.count(path) > 1:  # the same file twice would double its reviews
            raise PreprocessError(f"{path}: given twice" + (f" (it is {first})" if first != path else "")
                                  + "; each input file once")
    plans = []
    for index, path in enumerate(inputs):
        compressed = path.endswith(".gz")
        try:
            chosen = detect_format(path) if fmt == "auto" else fmt
            header, start = (), 0
            if chosen == "csv":
                with open_binary(path) as f:
                    header, start, _ = csv_header(f, path, opts)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise PreprocessError(f"{path}:1: truncated or corrupt gzip ({e})") from None
        if fmt == "auto":
            logging.info("%s: format %s (auto)", path, chosen)
        plan = FilePlan(index, path, chosen, os.path.getsize(path), compressed, header)
        if not compressed:
            plan.chunks = _plain_chunks(plan, start, opts)
        plans.append(plan)
    return plans


def _plain_chunks(plan: FilePlan, start: int, opts: Options) -> list[Chunk]:
    if plan.fmt == "text" and opts.text_whole_file:
        if plan.size > opts.max_record_bytes:
            raise PreprocessError(f"{plan.path}: {plan.size:,} bytes, more than --max_record_bytes="
                                  f"{opts.max_record_bytes} for one document (--text_whole_file)")
        cuts = [0, plan.size]
    elif plan.fmt == "csv":
        cuts = csv_boundaries(plan.path, start, plan.size, opts.chunk_bytes)
        if cuts is None:
            logging.warning("%s: its quote characters do not pair up (a stray quote?), so it is read by one "
                            "worker: cuts between records cannot be found safely", plan.path)
            cuts = [start, plan.size]
    else:
        cuts = _line_boundaries(plan.path, start, plan.size, opts.chunk_bytes)
    return [Chunk(plan.index, i, plan.path, plan.fmt, (b - a) + (start if i == 0 else 0), a, b, header=plan.header)
            for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]


def _line_boundaries(path: str, start: int, size: int, chunk_bytes: int) -> list[int]:
    """Offsets after the first newline at or after every chunk_bytes from `start`, then `size`."""
    cuts = [start]
    with open(path, "rb", buffering=0) as f:
        while cuts[-1] + chunk_bytes < size:
            f.seek(cuts[-1] + chunk_bytes - 1)
            position = f.tell()
            while True:  # a line of any length is crossed 1 MB at a time
                block = f.read(MB)
                newline = block.find(b"\n")
                if not block or newline >= 0:
                    break
                position += len(block)
            cut = position + newline + 1 if block and newline >= 0 else size
            if cut >= size:
                break
            cuts.append(cut)
    return cuts + [size]


def csv_boundaries(path: str, start: int, size: int, chunk_bytes: int) -> list[int] | None:
    """Cuts at newlines outside quoted fields, or None when the file's quotes do not pair up.

    In RFC 4180 CSV a quote inside a quoted field is doubled, so a newline is inside a field
    exactly when an odd number of quote characters precedes it. One pass counts them (at
    memory speed); a stray quote in an unquoted field makes the total odd, and then the
    counting cannot be trusted and the file is read in one piece.
    """
    cuts, quotes, position, target = [start], 0, start, start + chunk_bytes
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while block := f.read(16 * MB):
            scanned = 0  # the quotes of block[:scanned] are counted in `quotes`
            while position + len(block) >= target:
                newline = block.find(b"\n", max(target - position - 1, scanned))
                if newline < 0:
                    break
                quotes += block.count(b'"', scanned, newline + 1)
                scanned = newline + 1
                if quotes % 2 == 0:
                    if position + scanned >= size:
                        break
                    cuts.append(position + scanned)
                    target = cuts[-1] + chunk_bytes
            quotes += block.count(b'"', scanned)
            position += len(block)
    return cuts + [size] if quotes % 2 == 0 else None


# ---------------------------------------------------------------- the gzip reader

def _gzip_chunks(plan: FilePlan, opts: Options, part: int, parts: int):
    """Chunks of whole lines of a gzip file as one reader decompresses it; yields those with index % parts == part.

    Every reader cuts at the same places (the first line end, outside CSV quotes, after
    chunk_bytes), so ranks sharing a file agree on its chunks without talking.
    """
    with open(plan.path, "rb") as raw, gzip.GzipFile(fileobj=raw) as f:
        line_number = 1
        try:
            if plan.fmt == "csv":
                line_number += csv_header(f, plan.path, opts)[2]
            if plan.fmt == "text" and opts.text_whole_file:
                yield from _gzip_whole_file(plan, f, opts, part)
                return
            index, lines, size, quotes, overlong, first_line, consumed = 0, [], 0, 0, 0, line_number, 0
            for line in read_lines(f, opts.max_record_bytes):
                mine = index % parts == part
                if line is None:
                    if plan.fmt == "csv":
                        raise PreprocessError(f"{plan.path}:{line_number}: a line {too_long(opts)}")
                    overlong += mine
                else:
                    size += len(line)
                    quotes += line.count(b'"') if plan.fmt == "csv" else 0
                    if mine:
                        lines.append(line)
                line_number += 1
                if size >= opts.chunk_bytes and quotes % 2 == 0:
                    if mine:
                        yield Chunk(plan.index, index, plan.path, plan.fmt, raw.tell() - consumed, data=b"".join(lines),
                                    first_line=first_line, overlong=overlong, header=plan.header)
                    consumed = raw.tell()
                    index, lines, size, overlong, first_line = index + 1, [], 0, 0, line_number
            if index % parts == part:
                yield Chunk(plan.index, index, plan.path, plan.fmt, plan.size - consumed, data=b"".join(lines),
                            first_line=first_line, overlong=overlong, header=plan.header)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise PreprocessError(f"{plan.path}:{line_number}: truncated or corrupt gzip ({e})") from None


def _gzip_whole_file(plan: FilePlan, stream, opts: Options, part: int):
    """--text_whole_file: the decompressed file as one chunk, for part 0, refused above --max_record_bytes."""
    data = stream.read(opts.max_record_bytes + 1)
    if len(data) > opts.max_record_bytes:
        raise PreprocessError(f"{plan.path}: more than --max_record_bytes={opts.max_record_bytes} "
                              "bytes for one document (--text_whole_file)")
    if part == 0:
        yield Chunk(plan.index, 0, plan.path, plan.fmt, plan.size, data=data, first_line=1)


def rank_chunks(plans: list[FilePlan], opts: Options, rank: int, size: int):
    """This rank's chunks, in input order: every size-th chunk of the plain files; whole gzip files
    (largest first, to the least loaded rank) when there are at least as many as ranks, else
    every size-th chunk of each, which every rank then decompresses."""
    gzips = [p for p in plans if p.gzip]
    owner = {}
    if len(gzips) >= size:
        load = [0] * size
        for plan in sorted(gzips, key=lambda p: (-p.size, p.index)):
            owner[plan.index] = min(range(size), key=lambda r: (load[r], r))
            load[owner[plan.index]] += plan.size
    plain = 0
    for plan in plans:
        if not plan.gzip:
            for chunk in plan.chunks:
                if plain % size == rank:
                    yield chunk
                plain += 1
        elif plan.index in owner:
            if owner[plan.index] == rank:
                yield from _gzip_chunks(plan, opts, 0, 1)
        else:
            yield from _gzip_chunks(plan, opts, rank, size)
