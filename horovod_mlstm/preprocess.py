"""Review files -> cleaned, framed documents -> train/val/test TFRecord shards + manifest.json.

    python -m horovod_mlstm.preprocess --input reviews/*.json.gz --output_dir data/amazon --num_shards 128
    mpirun -np 16 python -m horovod_mlstm.preprocess ...   (or launch/preprocess.sh --hostfile H ...)

Each document is cleaned as the reference implementations did (HTML entities unescaped,
tags stripped, whitespace folded), encoded as UTF-8 and framed with records.DOC_END so the
model sees where reviews end. The split and the shard of a document are a stable hash of its
bytes, so rerunning gives the same split and adding input files moves no old review.

The input is cut into chunks of about --chunk_mb that end on record boundaries: byte ranges
of a plain file, or pieces of whole lines cut by the one reader that decompresses a gzip
file. Chunk boundaries depend on the input and --chunk_mb only. Every chunk becomes one
file whose records are grouped by (split, shard); a shard is its chunks' groups concatenated
in input order (TFRecord files concatenate), which is exactly what one sequential pass
writes. So the output is the same whatever the number of --workers (processes per rank) and
MPI ranks (mpi4py, only when launched under mpirun) share the chunks.

All ranks write into one staging directory inside --output_dir (a shared filesystem across
nodes); rank 0 merges and publishes (records.publish, atomic) only when every rank succeeded:
a failure, a signal or a kill leaves the previous output as it was.
"""

from __future__ import annotations

import ast
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import gzip
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import zlib

from absl import app, flags, logging

from horovod_mlstm import corpus
from horovod_mlstm.records import (RECORD_OVERHEAD, SPLITS, DataError, assign, frame, make_staging, publish,
                                   shard_name, split_position, splits_manifest)

FORMATS = ("auto", "amazon_json", "csv", "text")
MB = 1 << 20
EVAL_FRACTION_CAP = 0.1  # --min_eval_bytes never raises --val_fraction or --test_fraction above this
BUCKET = 1e-4  # resolution of the histogram of bytes over split positions h < 2 * EVAL_FRACTION_CAP
BUCKETS = round(2 * EVAL_FRACTION_CAP / BUCKET)
SMALL_CORPUS_BYTES = 1 << 30  # only a corpus with less text gets a second pass for --min_eval_bytes
STOP_SIGNALS = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGUSR1: 143}  # SIGUSR1: what mpirun passes on
_BAD_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by surrogateescape
_TAG_PROGRESS, _TAG_DONE, _TAG_STOP = 11, 12, 13


class PreprocessError(Exception):
    """A fatal input problem, explained in one line naming the file (and line)."""


class ReportedElsewhere(Exception):
    """This rank stops because another rank failed; rank 0 prints the one line."""


class Stopped(BaseException):
    """SIGTERM, SIGINT or SIGUSR1 arrived: stop, publish nothing. BaseException: no handler may swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Abandoned(Exception):
    """Another rank failed, so this rank's remaining work is pointless."""


class _LineError(Exception):
    """A fatal problem at a line of a chunk, numbered from the chunk's first line."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line, self.message = line, message


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a worker needs to turn a chunk into records."""

    num_shards: int
    val_fraction: float
    test_fraction: float
    text_field: str = "reviewText"
    csv_column: str = "sentence"
    text_whole_file: bool = False
    max_record_bytes: int = 16 * MB
    chunk_bytes: int = 32 * MB


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
    index: int
    path: str
    fmt: str
    size: int
    gzip: bool
    header: tuple[str, ...] = ()
    chunks: list[Chunk] = dataclasses.field(default_factory=list)  # plain files only


# ---------------------------------------------------------------- reading records

def _lines(stream, limit: int, stop: int | None = None):
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


def _too_long(opts: Options) -> str:
    return f"longer than --max_record_bytes={opts.max_record_bytes}"


def parse_review(line: str, text_field: str) -> tuple[str | None, str | None]:
    """(text, None) of one McAuley review line ("summary. reviewText"), or (None, why it has none)."""
    try:
        review = json.loads(line)
    except json.JSONDecodeError:
        try:  # the older dumps are Python dict literals, one per line
            review = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
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


def _csv_rows(lines, chunk: Chunk, opts: Options):
    """(line, text, reason) per CSV row; a line over the limit or a CSV error is fatal (rows can span lines)."""
    column = chunk.header.index(opts.csv_column)
    counted = [0]

    def decoded():
        for line in lines:
            counted[0] += 1
            if line is None:
                raise _LineError(counted[0], f"a line {_too_long(opts)} (raise it, or check the file is CSV)")
            yield line.decode("utf-8", "surrogateescape")

    reader = csv.reader(decoded())
    try:
        for row in reader:
            if row:
                text = row[column] if len(row) > column else None
                yield reader.line_num, text, None if text is not None else "short CSV row"
    except csv.Error as e:
        raise _LineError(reader.line_num, f"malformed CSV ({e})") from None


def _texts(chunk: Chunk, opts: Options):
    """(line within the chunk, text or None, why None) for every record of a chunk."""
    if chunk.data is not None:
        stream, stop = io.BytesIO(chunk.data), None
    else:
        stream, stop = open(chunk.path, "rb", buffering=MB), chunk.stop - chunk.start
        stream.seek(chunk.start)
    with stream:
        for _ in range(chunk.overlong):
            yield 0, None, _too_long(opts)
        if chunk.fmt == "text" and opts.text_whole_file:
            yield 1, stream.read().decode("utf-8", "surrogateescape"), None  # size checked when planned/read
            return
        lines = _lines(stream, opts.max_record_bytes, stop)
        if chunk.fmt == "csv":
            yield from _csv_rows(lines, chunk, opts)
            return
        for number, line in enumerate(lines, 1):
            if line is None:
                yield number, None, _too_long(opts)
                continue
            line = line.decode("utf-8", "surrogateescape")
            if not line.strip():
                continue
            if chunk.fmt == "text":
                yield number, line, None
            else:
                yield (number, *parse_review(line, opts.text_field))


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


def chunk_name(key: tuple[int, int]) -> str:
    """The staging file of chunk (file index, chunk index)."""
    return f"chunk-{key[0]:06d}-{key[1]:07d}.tfrecord"


def process_chunk(chunk: Chunk, opts: Options, staging: str) -> dict:
    """Worker: a chunk -> one file of its records grouped by (split, shard); returns what it wrote and skipped,
    and how its bytes fall on low split positions (to size val/test before choosing fractions)."""
    groups = collections.defaultdict(list)  # (split index, shard) -> records, in input order
    skipped = collections.Counter()
    low = [0] * BUCKETS
    csv.field_size_limit(opts.max_record_bytes)
    try:
        for _, text, reason in _texts(chunk, opts):
            if text is not None and _BAD_UTF8.search(text):
                text, reason = None, "invalid UTF-8"
            record = frame(text) if text is not None else None
            if text is not None and record is None:
                reason = "empty text"
            if record is None:
                skipped[reason] += 1
                continue
            split, shard = assign(record, opts.val_fraction, opts.test_fraction, opts.num_shards)
            groups[SPLITS.index(split), shard].append(record)
            bucket = int(split_position(record)[0] / BUCKET)
            if bucket < BUCKETS:
                low[bucket] += len(record)
    except _LineError as e:
        first = chunk.first_line or _line_number(chunk.path, chunk.start)
        raise PreprocessError(f"{chunk.path}:{first + e.line - 1}: {e.message}") from None
    except OSError as e:
        raise PreprocessError(f"{chunk.path}: cannot read ({e.strerror or e})") from None
    if groups:
        _write_groups(os.path.join(staging, chunk_name((chunk.file, chunk.index))), groups)
    return {"key": (chunk.file, chunk.index), "file": chunk.file, "span": chunk.span, "skipped": dict(skipped),
            "groups": [(key, len(records), sum(map(len, records))) for key, records in sorted(groups.items())],
            "low": low}


def _write_groups(path: str, groups: dict) -> None:
    import tensorflow as tf  # here, so only processes that write import it

    try:
        with tf.io.TFRecordWriter(path) as writer:
            for key in sorted(groups):
                for record in groups[key]:
                    writer.write(record)
    except tf.errors.OpError as e:
        raise PreprocessError(f"cannot write {path}: {e.message}") from None


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


def _csv_header(stream, path: str, opts: Options) -> tuple[tuple[str, ...], int, int]:
    """(column names, bytes and lines they take): the first record, which may span lines in quotes."""
    lines, quotes = [], 0
    for line in _lines(stream, opts.max_record_bytes):
        if line is None:
            raise PreprocessError(f"{path}:{len(lines) + 1}: a header line {_too_long(opts)}")
        lines.append(line)
        quotes += line.count(b'"')
        if quotes % 2 == 0:
            break
    header = b"".join(lines)
    fields = next(csv.reader(io.StringIO(header.decode("utf-8", "surrogateescape").lstrip("\ufeff"))), [])
    if opts.csv_column not in fields:
        raise PreprocessError(f"{path}:1: no column {opts.csv_column!r} (columns: {', '.join(fields)})")
    return tuple(fields), len(header), len(lines)


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


def _csv_boundaries(path: str, start: int, size: int, chunk_bytes: int) -> list[int] | None:
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


def plan_inputs(inputs: list[str], fmt: str, opts: Options) -> list[FilePlan]:
    """Checks every input and cuts the plain ones into chunks (gzip files are cut while they are read)."""
    if not inputs:
        raise PreprocessError("no input files given (--input)")
    for path in inputs:
        check_input(path)
    plans = []
    for index, path in enumerate(inputs):
        compressed = path.endswith(".gz")
        try:
            chosen = detect_format(path) if fmt == "auto" else fmt
            header, start = (), 0
            if chosen == "csv":
                with open_binary(path) as f:
                    header, start, _ = _csv_header(f, path, opts)
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
        cuts = _csv_boundaries(plan.path, start, plan.size, opts.chunk_bytes)
        if cuts is None:
            logging.warning("%s: its quote characters do not pair up (a stray quote?), so it is read by one "
                            "worker: cuts between records cannot be found safely", plan.path)
            cuts = [start, plan.size]
    else:
        cuts = _line_boundaries(plan.path, start, plan.size, opts.chunk_bytes)
    return [Chunk(plan.index, i, plan.path, plan.fmt, (b - a) + (start if i == 0 else 0), a, b, header=plan.header)
            for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]


def _gzip_chunks(plan: FilePlan, opts: Options, part: int, parts: int):
    """Chunks of whole lines of a gzip file as one reader decompresses it; yields those with index % parts == part.

    Every reader cuts at the same places (the first line end, outside CSV quotes, after
    chunk_bytes), so ranks sharing a file agree on its chunks without talking.
    """
    with open(plan.path, "rb") as raw, gzip.GzipFile(fileobj=raw) as f:
        line_number = 1
        try:
            if plan.fmt == "csv":
                line_number += _csv_header(f, plan.path, opts)[2]
            if plan.fmt == "text" and opts.text_whole_file:
                data = f.read(opts.max_record_bytes + 1)
                if len(data) > opts.max_record_bytes:
                    raise PreprocessError(f"{plan.path}: more than --max_record_bytes={opts.max_record_bytes} "
                                          "bytes for one document (--text_whole_file)")
                if part == 0:
                    yield Chunk(plan.index, 0, plan.path, plan.fmt, plan.size, data=data, first_line=1)
                return
            index, lines, size, quotes, overlong, first_line, consumed = 0, [], 0, 0, 0, line_number, 0
            for line in _lines(f, opts.max_record_bytes):
                mine = index % parts == part
                if line is None:
                    if plan.fmt == "csv":
                        raise PreprocessError(f"{plan.path}:{line_number}: a line {_too_long(opts)}")
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


# ---------------------------------------------------------------- ranks, workers, progress

class Progress:
    """Input bytes done, in total and of the first unfinished file, on rank 0's stderr (tqdm)."""

    def __init__(self, plans: list[FilePlan], enabled: bool):
        from tqdm import tqdm

        self.plans = plans
        self.done = [0] * len(plans)
        self.bar = tqdm(total=sum(p.size for p in plans), unit="B", unit_scale=True, desc="preprocess",
                        file=sys.stderr, mininterval=0.5, disable=not enabled)

    def add(self, file: int, nbytes: int) -> None:
        self.done[file] += nbytes
        current = next((p for p in self.plans if self.done[p.index] < p.size), None)
        self.bar.set_postfix_str(f"file {current.index + 1}/{len(self.plans)} {os.path.basename(current.path)} "
                                 f"{100 * self.done[current.index] / max(current.size, 1):.0f}%" if current else
                                 "all files read", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


class World:
    """The ranks of an mpirun job (one rank without MPI): their progress, results and failures.

    Other ranks send rank 0 their progress as they go and their results (or error) at the end;
    rank 0 tells them to stop early once any rank failed.
    """

    def __init__(self):
        self.comm, self.rank, self.size = None, 0, 1
        if any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
            try:
                from mpi4py import MPI
            except ImportError as e:
                raise PreprocessError(f"launched under MPI, but mpi4py cannot be imported ({e})") from None
            self.MPI, self.comm = MPI, MPI.COMM_WORLD
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.progress: Progress | None = None
        self.outcomes: dict[int, tuple] = {}  # rank -> (results, error)
        self.told_to_stop: set[int] = set()

    def bcast(self, value):
        return self.comm.bcast(value, root=0) if self.comm else value

    def gather(self, value) -> list:
        return self.comm.gather(value, root=0) if self.comm else [value]

    def add_progress(self, file: int, nbytes: int) -> None:
        if self.rank == 0:
            self.progress.add(file, nbytes)
        else:
            self.comm.send((file, nbytes), dest=0, tag=_TAG_PROGRESS)

    def poll(self) -> None:
        """Rank 0: takes in the other ranks' messages; others: raises _Abandoned once rank 0 said stop."""
        if self.comm is None:
            return
        status = self.MPI.Status()
        if self.rank != 0:
            if self.comm.iprobe(source=0, tag=_TAG_STOP):
                self.comm.recv(source=0, tag=_TAG_STOP)
                raise _Abandoned()
            return
        while self.comm.iprobe(source=self.MPI.ANY_SOURCE, tag=_TAG_PROGRESS, status=status):
            self.progress.add(*self.comm.recv(source=status.Get_source(), tag=_TAG_PROGRESS))
        while self.comm.iprobe(source=self.MPI.ANY_SOURCE, tag=_TAG_DONE, status=status):
            source = status.Get_source()
            self.outcomes[source] = self.comm.recv(source=source, tag=_TAG_DONE)
            if self.outcomes[source][1] is not None:
                self._stop_the_others()
        if any(error is not None for _, error in self.outcomes.values()):
            raise _Abandoned()

    def _stop_the_others(self) -> None:
        for rank in range(1, self.size):
            if rank not in self.outcomes and rank not in self.told_to_stop:
                self.comm.send(None, dest=rank, tag=_TAG_STOP)
                self.told_to_stop.add(rank)

    def barrier(self) -> None:
        """Ranks leave together: none exits (which makes mpirun end the job) before rank 0 has cleaned up."""
        if self.comm:
            self.comm.Barrier()

    def finish(self, results: list, error: str | None) -> dict[int, tuple] | None:
        """Every rank's (results, error) on rank 0 (None elsewhere), after each rank's share is done."""
        if self.rank != 0:
            self.comm.send((results, error), dest=0, tag=_TAG_DONE)
            return None
        if error is not None and self.comm is not None:
            self._stop_the_others()
        self.outcomes[0] = (results, error)
        while len(self.outcomes) < self.size:
            with contextlib.suppress(_Abandoned):
                self.poll()
            time.sleep(0.05)
        outcomes, self.outcomes, self.told_to_stop = self.outcomes, {}, set()
        return outcomes


def _ignore_interrupts() -> None:
    """Workers leave Ctrl-C (sent to the whole process group) to their parent, which stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def worker_pool(workers: int):
    """`workers` processes (None for 1: the chunks are processed in this one), stopped at once on any exception."""
    if workers == 1:
        yield None
        return
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_ignore_interrupts)
    try:
        yield pool
    except BaseException:
        for child in multiprocessing.active_children():
            child.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def run_chunks(chunks, opts: Options, staging: str, pool, workers: int, world: World) -> tuple[list[dict], list[int]]:
    """This rank's chunks through the pool, at most workers + 1 in flight (the memory bound); returns their
    results and their bytes on low split positions, summed."""
    results, low = [], [0] * BUCKETS

    def done(result):
        low[:] = map(sum, zip(low, result.pop("low")))
        results.append(result)
        world.add_progress(result["file"], result["span"])
        world.poll()

    if pool is None:
        for chunk in chunks:
            done(process_chunk(chunk, opts, staging))
        return results, low
    pending = collections.deque()

    def wait_oldest():
        while True:
            try:
                result = pending[0][0].result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                world.poll()
                continue
            pending.popleft()
            return done(result)

    try:
        for chunk in chunks:
            pending.append((pool.submit(process_chunk, chunk, opts, staging), chunk.path))
            while len(pending) > workers:
                wait_oldest()
        while pending:
            wait_oldest()
    except concurrent.futures.process.BrokenProcessPool:
        raise PreprocessError(f"{pending[0][1]}: a worker process died on it (killed, or out of memory: lower "
                              "--workers or --chunk_mb)") from None
    return results, low


# ---------------------------------------------------------------- merging and publishing

def merge(staging: str, layout: list[tuple], outputs: list[tuple[int, int]], num_shards: int) -> None:
    """Writes the shards `outputs` ((split index, shard)): each its groups from every chunk, in input order."""
    located = []  # per chunk: its file and {(split index, shard): (offset, length)}
    for name, groups in layout:
        offset, where = 0, {}
        for key, records, nbytes in groups:
            where[tuple(key)] = (offset, nbytes + RECORD_OVERHEAD * records)
            offset += nbytes + RECORD_OVERHEAD * records
        located.append((os.path.join(staging, name), where))
    for split, shard in outputs:
        path = os.path.join(staging, shard_name(SPLITS[split], shard, num_shards))
        try:
            with open(path, "wb") as out:
                for source, where in located:
                    if (split, shard) in where:
                        offset, length = where[split, shard]
                        with open(source, "rb") as f:
                            f.seek(offset)
                            while length > 0:
                                block = f.read(min(length, 16 * MB))
                                if not block:
                                    raise OSError(f"{source} is shorter than it was written")
                                out.write(block)
                                length -= len(block)
        except OSError as e:
            raise PreprocessError(f"cannot write {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def _signals_deferred():
    """Holds back the stop signals while the output switches, so it is switched completely or not at all."""
    held = set(STOP_SIGNALS)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        arrived = signal.sigpending() & held
        for signum in arrived:  # the work is published: a stop request now comes too late to matter
            signal.sigwait({signum})
            logging.warning("got %s while publishing; the output was published", signal.Signals(signum).name)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _eval_fractions(low: list[int], totals: dict, opts: Options, min_eval_bytes: int) -> tuple[float, float]:
    """val/test fractions giving each split at least min_eval_bytes (up to EVAL_FRACTION_CAP), from the bytes
    of this pass's records on low split positions (`low`, buckets of BUCKET); explicit zeros stay zero."""
    cumulative = [0]
    for nbytes in low:
        cumulative.append(cumulative[-1] + nbytes)

    def edge_reaching(floor_bytes: int, fallback: float) -> float:  # the first bucket edge with enough below it
        k = next((k for k, c in enumerate(cumulative) if c >= floor_bytes), None)
        return fallback if k is None else k * BUCKET

    val, test = opts.val_fraction, opts.test_fraction
    if 0 < val < EVAL_FRACTION_CAP and totals["val"] < min_eval_bytes:
        val = round(min(EVAL_FRACTION_CAP, max(val, edge_reaching(min_eval_bytes, EVAL_FRACTION_CAP))), 6)
    if 0 < test < EVAL_FRACTION_CAP and (totals["test"] < min_eval_bytes or val != opts.val_fraction):
        below_val = cumulative[min(BUCKETS, -int(-val // BUCKET))]  # val's bytes, its last bucket counted whole
        end = edge_reaching(below_val + min_eval_bytes, val + EVAL_FRACTION_CAP)
        test = round(min(EVAL_FRACTION_CAP, max(test, end - val)), 6)
    return val, test


def check_settings(num_shards: int, workers: int, max_bad_fraction: float, val_fraction: float,
                   test_fraction: float, min_eval_bytes: int, max_record_bytes: int, chunk_mb: float) -> None:
    """Flag values that cannot work are one line each, before any input is read."""
    if num_shards < 1:
        raise PreprocessError(f"--num_shards must be at least 1, got {num_shards}")
    if workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {workers}")
    if not 0 <= max_bad_fraction <= 1:
        raise PreprocessError(f"--max_bad_fraction must be from 0 to 1, got {max_bad_fraction}")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise PreprocessError("--val_fraction and --test_fraction must be >= 0 and sum to less than 1")
    if min_eval_bytes < 0:
        raise PreprocessError(f"--min_eval_bytes must be >= 0, got {min_eval_bytes}")
    if max_record_bytes < 1024:
        raise PreprocessError(f"--max_record_bytes must be at least 1024, got {max_record_bytes}")
    if not chunk_mb * MB >= 1024:
        raise PreprocessError(f"--chunk_mb must be at least 0.001 (1 KB), got {chunk_mb}")


def preprocess(inputs: list[str], output_dir: str, num_shards: int, fmt: str = "auto", workers: int = 1,
               max_bad_fraction: float = 0.01, *, val_fraction: float = 0.001, test_fraction: float = 0.001,
               min_eval_bytes: int = 32768, max_record_bytes: int = 16 * MB, chunk_mb: float = 32,
               text_field: str = "reviewText", csv_column: str = "sentence", text_whole_file: bool = False,
               progress: bool = True, world: World | None = None) -> dict | None:
    """The CLI's work on every rank: plan, process this rank's chunks, merge, publish. Rank 0 returns the manifest."""
    check_settings(num_shards, workers, max_bad_fraction, val_fraction, test_fraction, min_eval_bytes,
                   max_record_bytes, chunk_mb)
    started = time.monotonic()
    world = world or World()
    opts = Options(num_shards, val_fraction, test_fraction, text_field, csv_column, text_whole_file,
                   max_record_bytes, int(chunk_mb * MB))
    staging = None
    try:
        if world.rank == 0:
            try:
                plans = plan_inputs(inputs, fmt, opts)
                staging = make_staging(output_dir)
            except (PreprocessError, DataError):
                world.bcast(None)
                raise
            world.bcast((plans, staging))
        else:
            setup = world.bcast(None)
            if setup is None:
                raise ReportedElsewhere()
            plans, staging = setup
        with worker_pool(workers) as pool:
            layout, manifest = _passes(world, plans, opts, staging, pool, workers, max_bad_fraction, min_eval_bytes,
                                       progress)
        outputs = [(s, i) for s in range(len(SPLITS)) for i in range(num_shards)]
        error = None
        try:
            merge(staging, layout, outputs[world.rank::world.size], num_shards)
        except PreprocessError as e:
            error = f"rank {world.rank}: {e}" if world.size > 1 else str(e)
        errors = [e for e in world.gather(error) or [] if e]
        if world.rank != 0:
            return None
        if errors:
            raise PreprocessError(errors[0])
        for name, _ in layout:
            os.remove(os.path.join(staging, name))
        manifest["command"] = " ".join(sys.argv)
        try:
            with _signals_deferred():
                publish(staging, output_dir, manifest)
        except OSError as e:
            raise PreprocessError(f"cannot publish into {output_dir}: {e.strerror or e}") from None
        _report(output_dir, manifest, sum(p.size for p in plans), time.monotonic() - started)
        return manifest
    finally:
        if world.progress:
            world.progress.close()  # before any last line: the bar's own last line ends with it
        if world.rank == 0 and staging:
            shutil.rmtree(staging, ignore_errors=True)


def _passes(world, plans, opts, staging, pool, workers, max_bad_fraction, min_eval_bytes, progress):
    """Every rank processes its chunks; rank 0 checks the outcome. A small corpus gets one more pass with
    val/test fractions that reach --min_eval_bytes. Returns (chunk layout, manifest) on every rank."""
    requested = (opts.val_fraction, opts.test_fraction)
    while True:
        if world.rank == 0:
            world.progress = Progress(plans, progress)
        results, low, error = [], [], None
        try:
            results, low = run_chunks(rank_chunks(plans, opts, world.rank, world.size), opts, staging, pool, workers,
                                      world)
        except PreprocessError as e:
            error = str(e)
        except _Abandoned:
            error = "stopped"
        outcomes = world.finish((results, low), error)
        decision = None
        if world.rank == 0:
            world.progress.close()
            decision = _decide(world, outcomes, plans, opts, max_bad_fraction, min_eval_bytes, requested)
            if decision[0] == "fail":
                world.bcast(decision)
                raise PreprocessError(decision[1])
            if decision[0] == "rerun":
                for name in os.listdir(staging):
                    os.remove(os.path.join(staging, name))
        decision = world.bcast(decision)
        if decision[0] == "fail":
            raise ReportedElsewhere()
        if decision[0] == "merge":
            return decision[1], decision[2]
        opts = dataclasses.replace(opts, val_fraction=decision[1], test_fraction=decision[2])


def _decide(world, outcomes, plans, opts, max_bad_fraction, min_eval_bytes, requested):
    """Rank 0, after a pass: ("fail", line), ("rerun", val, test) or ("merge", chunk layout, manifest)."""
    failures = [(rank, error) for rank, (_, error) in sorted(outcomes.items()) if error not in (None, "stopped")]
    if failures:
        rank, error = failures[0]
        return "fail", f"rank {rank}: {error}" if world.size > 1 else error
    results = sorted((r for (rank_results, _), _ in outcomes.values() for r in rank_results), key=lambda r: r["key"])
    low = [sum(column) for column in zip(*(rank_low for (_, rank_low), _ in outcomes.values() if rank_low))]
    records = {s: [0] * opts.num_shards for s in SPLITS}
    nbytes = {s: [0] * opts.num_shards for s in SPLITS}
    per_file = [{"file": p.path, "format": p.fmt, "reviews": 0, "skipped": collections.Counter()} for p in plans]
    for result in results:
        for (split, shard), n, size in result["groups"]:
            records[SPLITS[split]][shard] += n
            nbytes[SPLITS[split]][shard] += size
            per_file[result["file"]]["reviews"] += n
        per_file[result["file"]]["skipped"].update(result["skipped"])
    skipped = sum((f["skipped"] for f in per_file), collections.Counter())
    good, bad = sum(map(sum, records.values())), sum(skipped.values())
    if good == 0:
        return "fail", f"{', '.join(p.path for p in plans)}: no usable records (skipped: {_reasons(skipped)})"
    if bad / (good + bad) > max_bad_fraction:
        return "fail", (f"{bad:,} of {good + bad:,} records were skipped ({_reasons(skipped)}), more than "
                        f"--max_bad_fraction={max_bad_fraction}")
    if 1 < opts.num_shards > good:
        return "fail", (f"--num_shards={opts.num_shards} is more than the {good:,} reviews, so most of the "
                        f"{3 * opts.num_shards:,} shard files would be empty; use at most that many (and at least "
                        "the number of training ranks)")
    totals = {s: sum(nbytes[s]) for s in SPLITS}
    if (opts.val_fraction, opts.test_fraction) == requested and sum(totals.values()) < SMALL_CORPUS_BYTES:
        raised = _eval_fractions(low, totals, opts, min_eval_bytes)
        if raised != requested:
            return "rerun", *raised
    for split in ("val", "test"):
        fraction = getattr(opts, f"{split}_fraction")
        if fraction > 0 and totals[split] < min_eval_bytes:
            logging.warning("the %s split has %d bytes, fewer than --min_eval_bytes=%d with --%s_fraction=%g: raise "
                            "the fraction, or training may need a smaller --eval_batch_size or --seq_length",
                            split, totals[split], min_eval_bytes, split, fraction)
    if (opts.val_fraction, opts.test_fraction) != requested:
        print(f"[preprocess] small corpus: --val_fraction {requested[0]:g} -> {opts.val_fraction:g}, "
              f"--test_fraction {requested[1]:g} -> {opts.test_fraction:g}, so that each split has at least "
              f"--min_eval_bytes={min_eval_bytes} (--min_eval_bytes=0 keeps the fractions)", flush=True)
    layout = [(chunk_name(r["key"]), r["groups"]) for r in results if r["groups"]]
    manifest = {
        "splits": splits_manifest(records, nbytes, opts.num_shards),
        "formats": sorted({p.fmt for p in plans}),
        "files": [{**f, "skipped": dict(sorted(f["skipped"].items()))} for f in per_file],
        "skipped": dict(sorted(skipped.items())),
        "val_fraction": opts.val_fraction, "test_fraction": opts.test_fraction,
        "requested_fractions": list(requested), "min_eval_bytes": min_eval_bytes,
    }
    return "merge", layout, manifest


def _reasons(skipped: dict) -> str:
    return ", ".join(f"{n:,} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1])) or "none"


def _report(output_dir: str, manifest: dict, input_bytes: int, seconds: float) -> None:
    splits = manifest["splits"]
    reviews = sum(splits[s]["reviews"] for s in SPLITS)
    text = sum(splits[s]["bytes"] for s in SPLITS)
    shards = len(splits["train"]["shards"])
    print(f"[preprocess] {output_dir}: {reviews:,} reviews, {text:,} bytes of text ("
          + ", ".join(f"{s} {splits[s]['reviews']:,} / {splits[s]['bytes']:,} B" for s in SPLITS)
          + f") in {shards} shard(s) per split, from {input_bytes / 1e6:,.1f} MB of input in {seconds:.1f} s = "
          f"{input_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s; skipped {sum(manifest['skipped'].values()):,}"
          f" ({_reasons(manifest['skipped'])})", flush=True)


# ---------------------------------------------------------------- command line

def _stop(signum, frame):
    raise Stopped(signum)


def main(argv):
    FLAGS = flags.FLAGS
    inputs = (FLAGS.input or []) + argv[1:]  # `--input a b c`: the shell's expansion of one glob
    if FLAGS.builtin:
        corpus.prepare_builtin(FLAGS.output_dir)
        print(f"[preprocess] built-in corpus in {FLAGS.output_dir}")
        return
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop)
    world = None
    try:
        world = World()
        preprocess(inputs, FLAGS.output_dir, FLAGS.num_shards, FLAGS.format, FLAGS.workers, FLAGS.max_bad_fraction,
                   val_fraction=FLAGS.val_fraction, test_fraction=FLAGS.test_fraction,
                   min_eval_bytes=FLAGS.min_eval_bytes, max_record_bytes=FLAGS.max_record_bytes,
                   chunk_mb=FLAGS.chunk_mb, text_field=FLAGS.text_field, csv_column=FLAGS.csv_column,
                   text_whole_file=FLAGS.text_whole_file, world=world)
        status = None
    except (PreprocessError, DataError) as e:
        status = f"error: {e}" if world is None or world.rank == 0 else 1  # every rank checks flags: one says so
    except ReportedElsewhere:
        status = 1
    except Stopped as stop:  # no goodbyes: the other ranks may be gone already
        if world is None or world.rank == 0:
            print(f"error: stopped by {stop.args[0]}; nothing was published, {FLAGS.output_dir} keeps its previous "
                  "output", file=sys.stderr, flush=True)
        sys.exit(STOP_SIGNALS[stop.signum])
    if world is not None:
        world.barrier()
    sys.exit(status)


if __name__ == "__main__":
    flags.DEFINE_multi_string("input", None, "Input files (repeat the flag, or list them after one --input).")
    flags.DEFINE_string("output_dir", "data/reviews", "Where the shards and manifest.json go.")
    flags.DEFINE_integer("num_shards", 8, "Shards per split (at least the number of training ranks, at most "
                         "the number of training reviews).")
    flags.DEFINE_enum("format", "auto", list(FORMATS), "Input format; auto decides per file.")
    flags.DEFINE_string("text_field", "reviewText", "amazon_json: the field holding the review text.")
    flags.DEFINE_string("csv_column", "sentence", "csv: the column holding the text.")
    flags.DEFINE_bool("text_whole_file", False, "text: each file is one document (default: one per line).")
    flags.DEFINE_float("val_fraction", 0.001, "Share of reviews in the validation split.")
    flags.DEFINE_float("test_fraction", 0.001, "Share of reviews in the test split.")
    flags.DEFINE_integer("min_eval_bytes", 32768, "A small corpus gets larger val/test fractions (up to "
                         f"{EVAL_FRACTION_CAP}) so each split has at least this many bytes; 0 keeps the fractions.")
    flags.DEFINE_integer("workers", 1, "Processes per rank (per machine) working on chunks in parallel.")
    flags.DEFINE_float("chunk_mb", 32, "Size of a unit of work; memory per worker grows with it.")
    flags.DEFINE_integer("max_record_bytes", 16 * MB, "Longer lines are skipped (counted) without being held in "
                         "memory; a CSV line or --text_whole_file document longer than this is an error.")
    flags.DEFINE_float("max_bad_fraction", 0.01, "Stop with an error when more records than this are skipped.")
    flags.DEFINE_bool("builtin", False, "Write the built-in synthetic corpus instead of reading --input.")
    app.run(main)
