"""Reading: exact round trip in stream order, one layout whatever the world size, only the
overlapping shards read, resets, and every way a data directory can be bad."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_shards
from horovod_mlstm import corpus
from horovod_mlstm.data import ByteStreams, check_split, read_range, split_streams
from horovod_mlstm.records import DataError, frame, split_shards, write_corpus

pytestmark = pytest.mark.unit


def test_text_to_shards_to_batches_reproduces_the_text(tmp_path):
    texts = list(corpus.texts(300, seed=5))
    write_corpus(texts, str(tmp_path), num_shards=1, val_fraction=0.0, test_fraction=0.0)
    expected = b"".join(frame(t) for t in texts)
    shards = split_shards(str(tmp_path), "train")
    assert read_range(shards, 0, len(expected)).tobytes() == expected  # one shard keeps document order

    streams = split_streams(str(tmp_path), "train", total_rows=3, seq_length=16)
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


def test_reset_marks_each_pass_and_positions_continue():
    streams = ByteStreams(np.arange(2 * 41, dtype=np.uint8), rows=2, seq_length=10)
    assert streams.windows_per_epoch == 4
    batches = list(streams.dataset(2, 6))
    assert [int(b["position"]) for b in batches] == [2, 3, 4, 5, 6, 7]
    assert [bool(b["reset"]) for b in batches] == [False, False, True, False, False, False]
    np.testing.assert_array_equal(batches[2]["inputs"].numpy()[1], np.arange(41, 51))  # row 1 starts over


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_layout_does_not_depend_on_the_world_size(tmp_path_factory, world):
    out = tmp_path_factory.getbasetemp() / "layout"
    if not (out / "manifest.json").exists():
        write_corpus(list(corpus.texts(400, seed=2)), str(out), num_shards=5, val_fraction=0.0, test_fraction=0.0)
    whole = split_streams(str(out), "train", total_rows=8, seq_length=8)
    rows = 8 // world
    parts = [split_streams(str(out), "train", 8, 8, first_row=r * rows, rows=rows) for r in range(world)]
    np.testing.assert_array_equal(np.concatenate([p.streams for p in parts]), whole.streams)


def test_a_rank_reads_only_the_shards_its_streams_overlap(tmp_path):
    shards = {"train": [[bytes([65 + i]) * 100] * 3 for i in range(4)]}  # 4 shards x 300 bytes: AAA.. BBB.. ...
    write_shards(tmp_path, shards)
    damaged = split_shards(str(tmp_path), "train")[3].path
    with open(damaged, "r+b") as f:  # flip a byte inside the second record's data: its CRC fails
        f.seek(116 + 12 + 50)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    # 4 streams of 300 bytes: the first three ranks of a 4-rank job never open shard 3.
    for rank in range(3):
        part = split_streams(str(tmp_path), "train", total_rows=4, seq_length=8, first_row=rank, rows=1)
        assert set(part.streams.tobytes()) == {65 + rank}
    with pytest.raises(DataError, match=r"corrupt TFRecord data in .*train-00003-of-00004.tfrecord "
                                        r"\(record 2 at byte offset 116\)"):
        split_streams(str(tmp_path), "train", total_rows=4, seq_length=8, first_row=3, rows=1)


def test_a_stream_can_span_shards(tmp_path):
    write_shards(tmp_path, {"train": [[b"ab" * 50], [b"cd" * 25, b"ef" * 25]]})
    whole = b"ab" * 50 + b"cd" * 25 + b"ef" * 25
    for start, stop in [(0, 200), (90, 110), (100, 150), (150, 200), (99, 101)]:
        assert read_range(split_shards(str(tmp_path), "train"), start, stop).tobytes() == whole[start:stop]


def test_bad_data_dirs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        split_shards(str(tmp_path / "nope"), "train")
    with pytest.raises(DataError, match=r"no manifest.json in .*; run `python -m horovod_mlstm.preprocess`"):
        split_shards(str(tmp_path), "train")

    data = write_shards(tmp_path / "d", {"train": [[b"x" * 500]], "val": [[b"tiny"]]})
    with pytest.raises(DataError, match=r"the val split .* has 4 bytes, fewer than the 36 that 4 streams of 8\+1 "
                                        r"bytes need; use a smaller --eval_batch_size"):
        check_split(str(data), "val", total_rows=4, seq_length=8)

    manifest = json.loads((data / "manifest.json").read_text())
    shard = data / manifest["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train-00000-of-00001.tfrecord has 506 bytes where manifest.json says 516"):
        split_shards(str(data), "train")
    shard.unlink()
    with pytest.raises(DataError, match=r"train-00000-of-00001.tfrecord is missing, but manifest.json lists it"):
        split_shards(str(data), "train")
    with pytest.raises(DataError, match=r"holds shards but no manifest"):
        (data / "manifest.json").unlink()
        split_shards(str(data), "val")

    old = write_shards(tmp_path / "old", {"train": [[b"x" * 500]]})
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["splits"]["train"]["shards"][0]["bytes"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="does not list each shard's record and byte counts .* rerun"):
        split_shards(str(old), "train")
    (old / "manifest.json").write_text("{half a manif")
    with pytest.raises(DataError, match="manifest.json is not valid JSON"):
        split_shards(str(old), "train")
