"""The work on one chunk, and the pool of processes that does it.

A worker turns a chunk into one staging file of its records grouped by (split, shard), in input
order within each group, and returns what it wrote and skipped. A rank keeps at most
--workers + 1 chunks in flight (the memory bound) and checks for news from the other ranks
while it waits.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import multiprocessing
import os
import re

from horovod_mlstm.preprocess.chunks import Chunk, chunk_texts
from horovod_mlstm.preprocess.settings import BUCKET, BUCKETS, MB, Options, PreprocessError
from horovod_mlstm.preprocess.world import ignore_interrupts
from horovod_mlstm.records import SPLITS, frame, split_at, split_position, write_tfrecords

# Bytes that were not UTF-8 (kept by surrogateescape as U+DC80..U+DCFF), or a lone surrogate escaped in JSON:
# text that UTF-8 cannot encode.
_NOT_UTF8 = re.compile("[\ud800-\udfff]")
CHUNK_FILES = "chunk-*.tfrecord"  # the glob pattern of chunk_name's


def chunk_name(key: tuple[int, int]) -> str:
    """The staging file of chunk (file index, chunk index)."""
    return f"chunk-{key[0]:06d}-{key[1]:07d}.tfrecord"


def process_chunk(chunk: Chunk, opts: Options, staging: str) -> dict:
    """Worker: a chunk -> one file of its records grouped by (split, shard); returns what it wrote and skipped,
    and how its bytes fall on low split positions (to size val/test before choosing fractions)."""
    groups = collections.defaultdict(list)  # (split index, shard) -> records, in input order
    skipped = collections.Counter()
    low = [0] * BUCKETS
    previous_limit = csv.field_size_limit(opts.max_record_bytes)  # process-wide: put it back afterwards
    try:
        for _, text, reason in chunk_texts(chunk, opts):
            if text is not None and not text.isascii() and _NOT_UTF8.search(text):
                text, reason = None, "invalid UTF-8"
            record = frame(text) if text is not None else None
            if text is not None and record is None:
                reason = "empty text"
            if record is None:
                skipped[reason] += 1
                continue
            position, n = split_position(record)  # records.assign's (split, shard), and the histogram's position
            split = SPLITS.index(split_at(position, opts.val_fraction, opts.test_fraction))
            groups[split, n % opts.num_shards].append(record)
            bucket = int(position / BUCKET)
            if bucket < BUCKETS:
                low[bucket] += len(record)
    finally:
        csv.field_size_limit(previous_limit)
    if groups:
        _write_groups(os.path.join(staging, chunk_name((chunk.file, chunk.index))), groups)
    return {"key": (chunk.file, chunk.index), "file": chunk.file, "span": chunk.span, "skipped": dict(skipped),
            "groups": [(key, len(records), sum(map(len, records))) for key, records in sorted(groups.items())],
            "low": low}


def _write_groups(path: str, groups: dict) -> None:
    """A chunk file: scratch in the staging dir, which is dropped whole on any failure, so written plainly."""
    try:
        with open(path, "wb", buffering=MB) as f:
            for key in sorted(groups):
                write_tfrecords(f, groups[key])
    except OSError as e:
        raise PreprocessError(f"cannot write {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def worker_pool(workers: int):
    """`workers` processes (None for 1: the chunks are processed in this one), stopped at once on any exception."""
    if workers == 1:
        yield None
        return
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=ignore_interrupts)
    try:
        yield pool
    except BaseException:
        for child in multiprocessing.active_children():
            child.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def run_chunks(chunks, opts: Options, staging: str, pool, workers: int, world) -> tuple[list[dict], list[int]]:
    """This rank's chunks through the pool, at most workers + 1 in flight (the memory bound); returns their
    results and their bytes on low split positions, summed. `world` takes the progress and is polled."""
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
