"""One preprocess run on every rank: plan, process this rank's chunks, merge, publish.

Rank 0 plans the chunks and makes the staging directory inside --output_dir (on a filesystem
every host sees); every rank processes its share of the chunks with its workers; rank 0 checks
the pass (outcome.decide), possibly asking for one more; the ranks then build the final shards in
parallel (shard k by rank k mod N) by copying byte ranges of the chunk files, and rank 0 publishes
(records.publish, atomic) only when every rank succeeded: a failure, a signal or a kill leaves
the previous output as it was.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
import time
from concurrent.futures.process import BrokenProcessPool

from horovod_mlstm.files import replace_whole
from horovod_mlstm.preprocess import outcome
from horovod_mlstm.preprocess.chunks import plan_inputs, rank_chunks
from horovod_mlstm.preprocess.settings import MB, Options, PreprocessError, check_settings
from horovod_mlstm.preprocess.worker import CHUNK_FILES, run_chunks, worker_pool
from horovod_mlstm.preprocess.world import Abandoned, Progress, ReportedElsewhere, World, signals_deferred
from horovod_mlstm.records import RECORD_OVERHEAD, SPLITS, DataError, make_staging, publish, remove_staging, shard_name


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
        plans, staging = _plan(world, inputs, fmt, opts, output_dir)
        with worker_pool(workers) as pool:
            layout, manifest = _passes(world, plans, opts, staging, pool, workers, max_bad_fraction, min_eval_bytes,
                                       progress)
            _merge_everywhere(world, pool, workers, staging, layout, num_shards)
        if world.rank != 0:
            return None
        _publish(staging, output_dir, layout, manifest)
        outcome.report(output_dir, manifest, sum(p.size for p in plans), time.monotonic() - started)
        return manifest
    finally:
        if world.progress:
            world.progress.close()  # before any last line: the bar's own last line ends with it
        if world.rank == 0 and staging:
            remove_staging(staging)


def _plan(world: World, inputs: list[str], fmt: str, opts: Options, output_dir: str) -> tuple[list, str]:
    """Rank 0 plans the chunks and makes the staging directory; every rank gets both (or stops)."""
    if world.rank != 0:
        setup = world.bcast(None)
        if setup is None:
            raise ReportedElsewhere()
        return setup
    try:
        plans = plan_inputs(inputs, fmt, opts)
        staging = make_staging(output_dir)
    except (PreprocessError, DataError):
        world.bcast(None)
        raise
    world.bcast((plans, staging))
    return plans, staging


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
        except Abandoned:
            error = "stopped"
        outcomes = world.finish((results, low), error)
        decision = None
        if world.rank == 0:
            world.progress.close()
            decision = outcome.decide(outcomes, world.size, plans, opts, max_bad_fraction, min_eval_bytes, requested)
            if decision[0] == "fail":
                world.bcast(decision)
                raise PreprocessError(decision[1])
            if decision[0] == "rerun":
                for path in glob.glob(os.path.join(staging, CHUNK_FILES)):
                    os.remove(path)
        decision = world.bcast(decision)
        if decision[0] == "fail":
            raise ReportedElsewhere()
        if decision[0] == "merge":
            return decision[1], decision[2]
        opts = dataclasses.replace(opts, val_fraction=decision[1], test_fraction=decision[2])


def _merge_everywhere(world: World, pool, workers: int, staging: str, layout: list[tuple], num_shards: int) -> None:
    """Every rank writes its share of the shards; the first failure, on rank 0, is the run's error."""
    outputs = [(s, i) for s in range(len(SPLITS)) for i in range(num_shards)][world.rank::world.size]
    error = None
    try:
        _merge_with(pool, workers, staging, layout, outputs, num_shards)
    except PreprocessError as e:
        error = f"rank {world.rank}: {e}" if world.size > 1 else str(e)
    errors = [e for e in world.gather(error) or [] if e]
    if world.rank == 0 and errors:
        raise PreprocessError(errors[0])


def _merge_with(pool, workers: int, staging: str, layout: list[tuple], outputs: list[tuple[int, int]],
                num_shards: int) -> None:
    """The shards `outputs`, shared among the rank's workers (written in this process without a pool)."""
    if pool is None:
        return merge(staging, layout, outputs, num_shards)
    try:
        for future in [pool.submit(merge, staging, layout, outputs[i::workers], num_shards) for i in range(workers)]:
            future.result()
    except BrokenProcessPool:
        raise PreprocessError("a worker process died while writing the shards (killed, or out of memory: lower "
                              "--workers)") from None


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
            with replace_whole(path, "wb") as out:  # on disk before the manifest that lists it
                for source, where in located:
                    if (split, shard) in where:
                        _copy_range(source, *where[split, shard], out)
        except OSError as e:
            raise PreprocessError(f"cannot write {path}: {e.strerror or e}") from None


def _copy_range(source: str, offset: int, length: int, out) -> None:
    with open(source, "rb") as f:
        f.seek(offset)
        while length > 0:
            block = f.read(min(length, 16 * MB))
            if not block:
                raise OSError(f"{source} is shorter than it was written")
            out.write(block)
            length -= len(block)


def _publish(staging: str, output_dir: str, layout: list[tuple], manifest: dict) -> None:
    """Rank 0: drops the chunk files and makes the shards output_dir's published data."""
    for name, _ in layout:
        os.remove(os.path.join(staging, name))
    manifest["command"] = " ".join(sys.argv)
    try:
        with signals_deferred():
            publish(staging, output_dir, manifest)
    except OSError as e:
        raise PreprocessError(f"cannot publish into {output_dir}: {e.strerror or e}") from None
