"""Reading: exact round trip in stream order, disjoint ranks, windows, resets, bad shards."""

from __future__ import annotations

import numpy as np
import pytest

from horovod_mlstm import corpus
from horovod_mlstm.data import (ByteStreams, DataError, global_streams, rank_streams, read_bytes, record_dataset,
                                shard_name, split_files, write_records)
from horovod_mlstm.preprocess import clean, write_corpus


def test_text_to_shards_to_batches_reproduces_the_text(tmp_path):
    texts = list(corpus.texts(300, seed=5))
    write_corpus(texts, str(tmp_path), num_shards=1, val_fraction=0.0, test_fraction=0.0)
    expected = b"".join(clean(t).encode() + b"\n" for t in texts)
    data = read_bytes(split_files(str(tmp_path), "train"))
    assert data.tobytes() == expected  # one shard keeps document order

    streams = rank_streams(str(tmp_path), "train", rows=3, seq_length=16)
    rebuilt = [bytearray() for _ in range(3)]
    for batch in streams.dataset(0, streams.windows_per_epoch):
        inputs, targets = batch["inputs"].numpy(), batch["targets"].numpy()
        np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])  # targets are inputs shifted by one
        for r in range(3):
            rebuilt[r] += bytes(inputs[r].astype(np.uint8))
    T = len(expected) // 3
    for r in range(3):  # each row is one contiguous stream of the text, in order
        assert bytes(rebuilt[r]) == expected[r * T: r * T + len(rebuilt[r])]
        assert len(rebuilt[r]) == streams.windows_per_epoch * 16 >= T - 16


def test_reset_marks_each_pass_and_positions_continue(tmp_path):
    streams = ByteStreams(np.arange(2 * 41, dtype=np.uint8), rows=2, seq_length=10)
    assert streams.windows_per_epoch == 4
    batches = list(streams.dataset(2, 6))
    assert [int(b["position"]) for b in batches] == [2, 3, 4, 5, 6, 7]
    assert [bool(b["reset"]) for b in batches] == [False, False, True, False, False, False]
    np.testing.assert_array_equal(batches[2]["inputs"].numpy()[1], np.arange(41, 51))  # row 1 starts over


@pytest.mark.parametrize("num_shards", [4, 1])  # file-level, then record-level sharding
def test_ranks_read_disjoint_data_covering_the_split(tmp_path, num_shards):
    texts = [f"review {i} " + "x" * (i % 7) for i in range(101)]
    write_corpus(texts, str(tmp_path), num_shards=num_shards, val_fraction=0.0, test_fraction=0.0)
    files = split_files(str(tmp_path), "train")
    per_rank = [[r.numpy() for r in record_dataset(files, rank, 2)] for rank in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(clean(t).encode() + b"\n" for t in texts)
    assert read_bytes(files, 1, 2).tobytes() == b"".join(per_rank[1])


def test_global_layout_does_not_depend_on_the_world_size(tmp_path):
    write_corpus(list(corpus.texts(200, seed=2)), str(tmp_path), num_shards=2, val_fraction=0.0, test_fraction=0.0)
    whole = global_streams(str(tmp_path), "train", 4, 8, first_row=0, rows=4)
    halves = [global_streams(str(tmp_path), "train", 4, 8, first_row=r * 2, rows=2) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([h.streams for h in halves]), whole.streams)
    one_rank = rank_streams(str(tmp_path), "train", 4, 8)  # a single rank reads the same layout
    np.testing.assert_array_equal(one_rank.streams, whole.streams)


def test_bad_data_dirs_and_shards(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        split_files(str(tmp_path / "nope"), "train")
    with pytest.raises(DataError, match="no train shards"):
        split_files(str(tmp_path), "train")
    write_records(str(tmp_path / shard_name("train", 0, 1)), [b"tiny"])
    with pytest.raises(DataError, match="fewer than the"):
        rank_streams(str(tmp_path), "train", rows=4, seq_length=8)
    path = tmp_path / shard_name("val", 0, 1)
    write_records(str(path), [b"x" * 1000, b"y" * 1000])
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(DataError, match="corrupt TFRecord"):
        read_bytes(split_files(str(tmp_path), "val"))
