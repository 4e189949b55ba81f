"""A split of TFRecord shards -> contiguous byte streams -> [batch, seq] windows for each rank.

Truncated BPTT with a persistent state needs every batch row to be one contiguous byte
stream: row b of batch k+1 continues exactly where row b of batch k stopped. The layout is
the same for every job, whatever the number of ranks:

  1. the split is its shards' records concatenated in manifest order, B bytes;
  2. it is cut into `total_rows` equal streams (the global batch in sequences), S = B // total_rows
     bytes each: stream r is bytes [r*S, (r+1)*S);
  3. a rank that carries streams [first, first+rows) reads only bytes [first*S, (first+rows)*S),
     from the shards that overlap them (found from the manifest's byte counts), and serves
     window k of each: inputs bytes [kL, kL+L), targets [kL+1, kL+L+1).

So a stream's bytes never depend on how many ranks there are: a job can resume on another
number of ranks (same global batch), and an elastic job only reassigns streams. A rank holds
its share in memory (40 GB over 128 ranks is ~310 MB). The position in the streams is one
integer, the global window count, which the checkpoint stores.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from horovod_mlstm.records import RECORD_OVERHEAD, DataError, Shard, split_shards

_FIX = {"train": "use fewer ranks, a smaller --batch_size_per_worker or --seq_length, or more data",
        "val": "use a smaller --eval_batch_size or --seq_length, or preprocess with a larger --val_fraction",
        "test": "use a smaller --batch_size_per_worker or --seq_length, or preprocess with a larger "
                "--test_fraction"}


def _locate_damage(shard: Shard) -> str:
    """Where a shard's TFRecord framing breaks: record number and byte offset in the file."""
    records, offset = 0, 0
    try:
        for record in tf.data.TFRecordDataset([shard.path]):
            records += 1
            offset += len(record.numpy()) + RECORD_OVERHEAD
    except tf.errors.DataLossError:
        pass
    return f"record {records + 1} at byte offset {offset:,}"


def read_range(shards: list[Shard], start: int, stop: int) -> np.ndarray:
    """Bytes [start, stop) of the shards' records concatenated, reading only shards that overlap."""
    out = np.empty(stop - start, np.uint8)
    shard_start = 0
    for shard in shards:
        shard_stop = shard_start + shard.bytes
        if shard_stop > start and shard_start < stop:
            position = shard_start  # split offset of the next byte this shard yields
            try:
                for batch in tf.data.TFRecordDataset([shard.path]).batch(1024).prefetch(2):
                    blob = b"".join(batch.numpy().tolist())
                    lo, hi = max(start, position), min(stop, position + len(blob))
                    if lo < hi:
                        out[lo - start:hi - start] = np.frombuffer(blob, np.uint8, hi - lo, lo - position)
                    position += len(blob)
                    if position >= stop:
                        break
            except tf.errors.DataLossError:
                raise DataError(f"corrupt TFRecord data in {shard.path} ({_locate_damage(shard)}); "
                                "rerun preprocess") from None
            if position < min(stop, shard_stop):
                raise DataError(f"{shard.path} holds {position - shard_start:,} bytes of records where the "
                                f"manifest says {shard.bytes:,}; rerun preprocess")
        shard_start = shard_stop
        if shard_start >= stop:
            break
    return out


@dataclasses.dataclass
class ByteStreams:
    """`rows` contiguous streams cut from one byte array, served as windows of `seq_length`."""

    data: np.ndarray
    rows: int
    seq_length: int

    def __post_init__(self):
        need = self.rows * (self.seq_length + 1)
        if self.data.size < need:
            raise DataError(f"{self.data.size} bytes are fewer than the {need} needed for {self.rows} streams of "
                            f"{self.seq_length}+1 bytes")
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
        return block[:, :-1], block[:, 1:], np.bool_(k == 0)

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
        """Windows from global position `start` on (forever, or `count` of them).

        Windows are cut from the NumPy streams (tf.numpy_function), not from a tf.constant copy of
        them, so a rank holds its share of the split once.
        """
        rows, L = self.rows, self.seq_length

        def window(position):
            inputs, targets, reset = tf.numpy_function(lambda p: self.window(int(p)), [position],
                                                       (tf.int32, tf.int32, tf.bool), stateful=False)
            return {"inputs": tf.ensure_shape(inputs, [rows, L]), "targets": tf.ensure_shape(targets, [rows, L]),
                    "reset": tf.ensure_shape(reset, []), "position": position}

        stop = np.iinfo(np.int64).max if count is None else start + count
        ds = tf.data.Dataset.range(start, stop).map(window, num_parallel_calls=tf.data.AUTOTUNE,
                                                    deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)


def split_bytes(data_dir: str, split: str) -> int:
    """Bytes in a split, from the manifest (checked against the shard files)."""
    return sum(s.bytes for s in split_shards(data_dir, split))


def check_split(data_dir: str, split: str, total_rows: int, seq_length: int) -> list[Shard]:
    """The split's shards, checked to hold enough bytes for `total_rows` streams (without reading them)."""
    shards = split_shards(data_dir, split)
    total = sum(s.bytes for s in shards)
    if total // total_rows < seq_length + 1:
        raise DataError(f"the {split} split of {data_dir!r} has {total:,} bytes, fewer than the "
                        f"{total_rows * (seq_length + 1):,} that {total_rows} streams of {seq_length}+1 bytes "
                        f"need; {_FIX[split]}")
    return shards


def split_streams(data_dir: str, split: str, total_rows: int, seq_length: int, first_row: int = 0,
                  rows: int | None = None) -> ByteStreams:
    """Streams [first_row, first_row + rows) of the split laid out as `total_rows` streams."""
    rows = total_rows - first_row if rows is None else rows
    shards = check_split(data_dir, split, total_rows, seq_length)
    length = sum(s.bytes for s in shards) // total_rows
    return ByteStreams(read_range(shards, first_row * length, (first_row + rows) * length), rows, seq_length)
