"""Sharded TFRecords of reviews -> per-rank contiguous byte streams -> [batch, seq] windows.

Truncated BPTT with a persistent state needs every batch row to be one contiguous byte
stream: row b of batch k+1 continues exactly where row b of batch k stopped. So each rank

  1. reads its share of the split with tf.data (whole files per rank when there are at least
     as many files as ranks, every size-th record otherwise), in a fixed order;
  2. lays its bytes out as `rows` equal contiguous streams (rows = batch per worker);
  3. serves window k of every stream: inputs bytes [kL, kL+L), targets [kL+1, kL+L+1).

A rank holds its share in memory (40 GB over 128 ranks is ~310 MB each). The position in
the stream is one integer, the global window count, which the checkpoint stores, so a
resumed job continues with exactly the next window.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np
import tensorflow as tf
from absl import logging

SPLITS = ("train", "val", "test")
DOC_END = b"\n"  # every review is framed as cleaned text + DOC_END (whitespace inside is folded)


class DataError(Exception):
    """A problem with the data directory or its files, explained in one line."""


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def split_files(data_dir: str, split: str) -> list[str]:
    """The shards of one split, in order; a clear error when there are none."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir!r} does not exist")
    files = sorted(glob.glob(os.path.join(data_dir, f"{split}-*-of-*.tfrecord")))
    if not files:
        raise DataError(f"no {split} shards ({split}-*-of-*.tfrecord) in {data_dir!r}; "
                        "run `python -m horovod_mlstm.preprocess` first")
    return files


def write_records(path: str, records) -> int:
    """Writes raw byte records to a TFRecord file atomically (temp file, then rename)."""
    tmp = path + ".tmp"
    n = 0
    with tf.io.TFRecordWriter(tmp) as writer:
        for record in records:
            writer.write(record)
            n += 1
    os.replace(tmp, path)
    return n


def record_dataset(files: list[str], rank: int = 0, num_ranks: int = 1,
                   parallel_reads: int = 4) -> tf.data.Dataset:
    """This rank's records, sharded before anything else, in a reproducible order.

    Files are read in parallel (interleave) but emitted deterministically: the byte stream
    must be the same after a restart for resume to continue at the right byte.
    """
    if len(files) >= num_ranks:
        files = files[rank::num_ranks]
        ds = tf.data.Dataset.from_tensor_slices(files)
        ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(parallel_reads, len(files)),
                           block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds
    if rank == 0:
        logging.warning("%d files for %d ranks: sharding by record, so every rank reads every file; "
                        "preprocess with --num_shards >= the number of ranks to avoid it",
                        len(files), num_ranks)
    return tf.data.TFRecordDataset(files, num_parallel_reads=None).shard(num_ranks, rank)


def read_bytes(files: list[str], rank: int = 0, num_ranks: int = 1) -> np.ndarray:
    """This rank's share of a split as one uint8 array, records concatenated in order."""
    chunks = []
    try:
        for batch in record_dataset(files, rank, num_ranks).batch(4096).prefetch(2):
            chunks.append(b"".join(batch.numpy().tolist()))
    except tf.errors.DataLossError as e:
        raise DataError(f"corrupt TFRecord data in {files}: {e.message.splitlines()[0]}") from None
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


@dataclasses.dataclass
class ByteStreams:
    """`rows` contiguous streams cut from one byte array, served as windows of `seq_length`."""

    data: np.ndarray
    rows: int
    seq_length: int

    def __post_init__(self):
        need = self.rows * (self.seq_length + 1)
        if self.data.size < need:
            raise DataError(f"this rank has {self.data.size} bytes, fewer than the {need} needed for "
                            f"{self.rows} streams of {self.seq_length}+1 bytes; use fewer ranks, a smaller "
                            "batch or seq_length, or more data")
        self.stream_length = self.data.size // self.rows
        self.streams = self.data[: self.rows * self.stream_length].reshape(self.rows, self.stream_length)
        self.windows_per_epoch = (self.stream_length - 1) // self.seq_length

    def window(self, position: int):
        """(inputs [rows, L] int32, targets [rows, L] int32, reset) for a global window count.

        `reset` is True at the start of every pass over the streams: the RNN state must be
        zeroed there because the stream starts over.
        """
        k = position % self.windows_per_epoch
        start = k * self.seq_length
        block = self.streams[:, start : start + self.seq_length + 1].astype(np.int32)
        return block[:, :-1], block[:, 1:], k == 0

    def tail(self):
        """(inputs, targets) [rows, T] for the T < seq_length bytes after the last full window.

        Training never sees them (every window has seq_length bytes); a full evaluation scores
        them so that every byte of a stream but its first is a target. None when T is 0.
        """
        start = self.windows_per_epoch * self.seq_length
        if start + 1 >= self.stream_length:
            return None
        block = self.streams[:, start:].astype(np.int32)
        return block[:, :-1], block[:, 1:]

    def dataset(self, start: int = 0, count: int | None = None) -> tf.data.Dataset:
        """Windows from global position `start` on (forever, or `count` of them)."""
        streams = tf.constant(self.streams)
        L, W = self.seq_length, self.windows_per_epoch

        def window(position):
            k = position % W
            block = tf.cast(streams[:, k * L : k * L + L + 1], tf.int32)
            return {"inputs": block[:, :-1], "targets": block[:, 1:], "reset": tf.equal(k, 0),
                    "position": position}

        stop = np.iinfo(np.int64).max if count is None else start + count
        ds = tf.data.Dataset.range(start, stop).map(window, num_parallel_calls=tf.data.AUTOTUNE,
                                                    deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)


def rank_streams(data_dir: str, split: str, rows: int, seq_length: int,
                 rank: int = 0, num_ranks: int = 1) -> ByteStreams:
    """Reads this rank's share of a split and lays it out as contiguous streams."""
    data = read_bytes(split_files(data_dir, split), rank, num_ranks)
    if data.size == 0:
        raise DataError(f"the {split} split in {data_dir!r} has no data for rank {rank} of {num_ranks}")
    return ByteStreams(data, rows, seq_length)


def global_streams(data_dir: str, split: str, total_rows: int, seq_length: int,
                   first_row: int, rows: int) -> ByteStreams:
    """Rows [first_row, first_row + rows) of `total_rows` streams laid out over the whole split.

    Elastic jobs use this layout: every stream's bytes are the same whatever the number of
    ranks, so when ranks come and go the streams are only reassigned, and none is read twice
    or skipped. The price is that each rank reads the whole split once at (re)start.
    """
    whole = ByteStreams(read_bytes(split_files(data_dir, split)), total_rows, seq_length)
    return ByteStreams(whole.streams[first_row:first_row + rows].reshape(-1), rows, seq_length)
