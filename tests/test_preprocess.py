"""Preprocessing: formats, a lossless McAuley round trip, stable splits, and every bad input."""

from __future__ import annotations

import gzip
import json
import os

import pytest

import tensorflow as tf

from conftest import last_line, python
from horovod_mlstm.preprocess import PreprocessError, parse_review, preprocess
from horovod_mlstm.records import assign, clean, split_shards

OPTS = dict(text_field="reviewText", csv_column="sentence", text_whole_file=False, val_fraction=0.2,
            test_fraction=0.2)


def records(out, split=None) -> list[bytes]:
    splits = [split] if split else ["train", "val", "test"]
    found = []
    for s in splits:
        for shard in split_shards(str(out), s):
            found += [r.numpy() for r in tf.data.TFRecordDataset([shard.path])]
    return found


def tree(directory) -> dict:
    """Every file under a directory (relative path -> bytes), to compare before and after."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def review_line(text, summary="Nice", **extra):
    return json.dumps({"reviewerID": "A1", "summary": summary, "reviewText": text, "overall": 5.0, **extra}) + "\n"


def test_clean_and_parse():
    assert clean(" Great &amp; <b>cheap</b>\n\tstrings ") == "Great & cheap strings"
    assert parse_review(review_line("Works."), "reviewText") == "Nice. Works."
    assert parse_review("{'summary': 'Old', 'reviewText': 'python dict'}", "reviewText") == "Old. python dict"
    assert parse_review('{"reviewText": 3}', "reviewText") is None
    assert parse_review("{not json", "reviewText") is None


def test_mcauley_sample_preprocesses_without_loss(tmp_path, shared_dir):
    sample = shared_dir / "data" / "amazon" / "musical_instruments_5core_sample.json"
    manifest = preprocess([str(sample)], str(tmp_path / "out"), 2, **OPTS)
    expected = []
    for line in sample.read_text().splitlines():
        review = json.loads(line)
        expected.append(clean(f"{review['summary']}. {review['reviewText']}").encode() + b"\n")
    assert sorted(records(tmp_path / "out")) == sorted(expected)
    assert sum(manifest["splits"][s]["reviews"] for s in manifest["splits"]) == len(expected) == 50
    assert manifest["formats"] == ["amazon_json"] and manifest["skipped"] == {}
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["splits"]["train"]["shards"][0]["file"].endswith("/train-00000-of-00002.tfrecord")


def test_split_is_stable_and_adding_files_moves_nothing(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("".join(review_line(f"review number {i}") for i in range(200)))
    b.write_text("".join(review_line(f"another review {i}") for i in range(200)))
    preprocess([str(a)], str(tmp_path / "one"), 3, **OPTS)
    preprocess([str(a), str(b)], str(tmp_path / "two"), 3, **OPTS)
    for split in ("train", "val", "test"):
        old = set(records(tmp_path / "one", split))
        assert old and old <= set(records(tmp_path / "two", split))
    for r in records(tmp_path / "one", "val"):
        assert assign(r, 0.2, 0.2)[0] == "val"


def test_workers_do_not_change_the_output(tmp_path):
    inputs = []
    for i in range(3):
        p = tmp_path / f"in{i}.json"
        p.write_text("".join(review_line(f"file {i} review {j}") for j in range(150)))
        inputs.append(str(p))
    preprocess(inputs, str(tmp_path / "w1"), 2, workers=1, **OPTS)
    preprocess(inputs, str(tmp_path / "w2"), 2, workers=2, **OPTS)
    for split in ("train", "val", "test"):
        for a, b in zip(split_shards(str(tmp_path / "w1"), split), split_shards(str(tmp_path / "w2"), split)):
            assert open(a.path, "rb").read() == open(b.path, "rb").read(), a.path


def test_formats_gzip_csv_text_and_auto(tmp_path):
    gz = tmp_path / "r.json.gz"
    with gzip.open(gz, "wt") as f:
        f.write(review_line("from gzip"))
        f.write("{'summary': 'Dict', 'reviewText': 'literal line'}\n")
    csv_path = tmp_path / "s.csv"
    csv_path.write_text('label,sentence\n1,"a, quoted sentence"\n0,plain one\n')
    txt = tmp_path / "t.txt"
    txt.write_text("first line doc\n\nsecond line doc\n")
    manifest = preprocess([str(gz), str(csv_path), str(txt)], str(tmp_path / "out"), 1, **OPTS)
    assert manifest["formats"] == ["amazon_json", "csv", "text"]
    assert sorted(records(tmp_path / "out")) == sorted([
        b"Nice. from gzip\n", b"Dict. literal line\n", b"a, quoted sentence\n", b"plain one\n",
        b"first line doc\n", b"second line doc\n"])
    whole = preprocess([str(txt)], str(tmp_path / "whole"), 1, fmt="text", **{**OPTS, "text_whole_file": True})
    assert records(tmp_path / "whole") == [b"first line doc second line doc\n"]
    assert whole["splits"]["train"]["reviews"] + whole["splits"]["val"]["reviews"] + whole["splits"]["test"]["reviews"] == 1


def test_malformed_and_invalid_utf8_records_are_skipped_and_counted(tmp_path):
    p = tmp_path / "mixed.json"
    good = "".join(review_line(f"good review {i}") for i in range(98))
    p.write_bytes(good.encode() + b"{broken json\n" + b'{"summary": "x", "reviewText": "bad \xff byte"}\n')
    manifest = preprocess([str(p)], str(tmp_path / "out"), 1, max_bad_fraction=0.05, **OPTS)
    assert manifest["skipped"] == {"malformed JSON": 1, "invalid UTF-8": 1}
    assert len(records(tmp_path / "out")) == 98


@pytest.fixture
def good_output(tmp_path):
    src = tmp_path / "good.json"
    src.write_text("".join(review_line(f"kept review {i}") for i in range(50)))
    out = tmp_path / "out"
    preprocess([str(src)], str(out), 1, **OPTS)
    return out, tree(out)


def write_bad(tmp_path, kind):
    if kind == "missing":
        return str(tmp_path / "nope.json")
    if kind == "empty":
        (tmp_path / "empty.json").write_text("")
        return str(tmp_path / "empty.json")
    if kind == "truncated_gz":
        data = gzip.compress("".join(review_line(f"r {i}") for i in range(2000)).encode())
        (tmp_path / "cut.json.gz").write_bytes(data[: len(data) // 2])
        return str(tmp_path / "cut.json.gz")
    if kind == "too_many_bad":
        (tmp_path / "bad.json").write_text(review_line("ok") + "{oops\n" * 5)
        return str(tmp_path / "bad.json")
    (tmp_path / "nocol.csv").write_text("label,text\n1,hello\n")
    return str(tmp_path / "nocol.csv")


@pytest.mark.parametrize("kind, message", [
    ("missing", "nope.json: no such file"),
    ("empty", "no usable records"),
    ("truncated_gz", "cut.json.gz:"),
    ("too_many_bad", "more than --max_bad_fraction"),
    ("no_column", "nocol.csv:1: no column 'sentence'"),
])
def test_fatal_input_keeps_previous_output(tmp_path, good_output, kind, message):
    out, before = good_output
    with pytest.raises(PreprocessError, match=message):
        preprocess([write_bad(tmp_path, kind)], str(out), 1, **OPTS)
    assert tree(out) == before
    assert not [n for n in os.listdir(out) if n.startswith(".staging-")]  # no staging dir left


def test_cli_success_and_one_line_failure(tmp_path):
    src = tmp_path / "r.json"
    src.write_text("".join(review_line(f"cli review {i}") for i in range(30)))
    other = tmp_path / "r2.json"
    other.write_text(review_line("second file"))
    proc = python("-m", "horovod_mlstm.preprocess", "--input", str(src), str(other),
                  f"--output_dir={tmp_path}/out", "--num_shards=2", check=True)
    assert "[preprocess]" in proc.stdout
    assert sum(s.bytes for s in split_shards(str(tmp_path / "out"), "train")) > 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["command"].count("r.json") == 1
    proc = python("-m", "horovod_mlstm.preprocess", "--input", str(tmp_path / "missing.json"),
                  f"--output_dir={tmp_path}/out2")
    assert proc.returncode != 0 and last_line(proc.stderr) == f"error: {tmp_path}/missing.json: no such file"
