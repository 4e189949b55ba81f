"""Preprocessing in one process: formats, chunks within a file, identical output whatever the workers,
bounded memory, small corpora, every bad input and flag, and stopping on signals."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import signal
import subprocess
import time
import tracemalloc

import pytest
import tensorflow as tf
from absl import flags

from conftest import ENV, PYTHON, REPO, TINY_MODEL_FLAGS, last_line, python
from horovod_mlstm.preprocess import PreprocessError, parse_review, preprocess
from horovod_mlstm.preprocess.__main__ import arguments, define_flags
from horovod_mlstm.preprocess.chunks import csv_boundaries
from horovod_mlstm.records import assign, clean, split_shards

OPTS = dict(text_field="reviewText", csv_column="sentence", text_whole_file=False, val_fraction=0.2,
            test_fraction=0.2, progress=False)
PREPROCESS = [PYTHON, "-m", "horovod_mlstm.preprocess"]


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


def shards_and_manifest(out) -> tuple[dict, dict]:
    """(shard file name -> bytes, manifest without its run-specific fields) of a published output."""
    manifest = json.loads((out / "manifest.json").read_text())
    run_dir = manifest["splits"]["train"]["shards"][0]["file"].split("/")[0]
    shards = {p.name: p.read_bytes() for p in sorted((out / run_dir).iterdir())}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            shard["file"] = shard["file"].split("/", 1)[1]  # shards-<run>/ differs per run
    del manifest["command"]  # the command line differs per run
    return shards, manifest


def write_mixed_inputs(tmp_path) -> list[str]:
    """A larger JSON file (many chunks at --chunk_mb=0.02), the same gzipped, a CSV with quoted newlines, text."""
    big = tmp_path / "big.json"
    big.write_text("".join(review_line(f"review {i} " + "words " * (i % 40), summary=f"S{i % 7}")
                           for i in range(1500)))
    gz = tmp_path / "big.json.gz"
    gz.write_bytes(gzip.compress(big.read_bytes()))
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["label", "sentence"])
    for i in range(400):
        writer.writerow([i % 2, f'row {i} says "hi"\nover two lines' if i % 3 == 0 else f"row {i}, plain"])
    (tmp_path / "s.csv").write_text(rows.getvalue())
    (tmp_path / "t.txt").write_text("".join(f"text line {i}\n" for i in range(300)))
    return [str(big), str(gz), str(tmp_path / "s.csv"), str(tmp_path / "t.txt")]


@pytest.mark.unit
def test_clean_and_parse():
    assert clean(" Great &amp; <b>cheap</b>\n\tstrings ") == "Great & cheap strings"
    assert parse_review(review_line("Works."), "reviewText") == ("Nice. Works.", None)
    assert parse_review("{'summary': 'Old', 'reviewText': 'python dict'}", "reviewText") == ("Old. python dict", None)
    assert parse_review('{"reviewText": 3}', "reviewText") == (None, "'reviewText' is not a string")
    assert parse_review('{"summary": "no text"}', "reviewText") == (None, "no 'reviewText' field")
    assert parse_review("[1, 2]", "reviewText") == (None, "not a JSON object")
    assert parse_review("{not json", "reviewText") == (None, "malformed JSON")
    old_dump = "{'reviewerID': 'A2SUAM1J3GNN3B', 'helpful': [0, 0], 'reviewText': 'Fine.', 'summary': 'ok'}"
    assert parse_review(old_dump, "reviewText") == ("ok. Fine.", None)


@pytest.mark.unit
def test_pathological_lines_are_malformed_and_cost_little_memory():
    """Nesting deeper than the interpreter's limit, and a Python literal of many values (ast.literal_eval's
    syntax tree took ~340 bytes per byte of it): both are malformed lines, parsed in a few times their size."""
    deep = '{"reviewText": "x", "a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    many_values = "{'reviewText': 'x', 'a': [" + "1, " * 350_000 + "]}"  # 1 MB
    long_text = "{'summary': 'Old', 'reviewText': '" + "word " * 200_000 + "', 'helpful': [2, 3]}"
    tracemalloc.start()
    try:
        for line in (deep, many_values):
            assert parse_review(line, "reviewText") == (None, "malformed JSON")
        assert parse_review(long_text, "reviewText")[0].startswith("Old. word word")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * len(many_values), f"{peak / 1e6:.0f} MB to parse 1 MB lines"


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
@pytest.mark.parametrize("which", ["one_plain_file", "one_gzip_file", "several_files"])
def test_output_is_identical_whatever_the_chunks_and_workers(tmp_path, which):
    """One sequential pass (one chunk per file) vs many chunks in 1 and in 2 worker processes."""
    inputs = write_mixed_inputs(tmp_path)
    inputs = {"one_plain_file": inputs[:1], "one_gzip_file": inputs[1:2], "several_files": inputs}[which]
    sequential = preprocess(inputs, str(tmp_path / "seq"), 3, chunk_mb=64, **OPTS)
    preprocess(inputs, str(tmp_path / "chunks"), 3, chunk_mb=0.02, **OPTS)
    preprocess(inputs, str(tmp_path / "workers"), 3, workers=2, chunk_mb=0.02, **OPTS)
    reference = shards_and_manifest(tmp_path / "seq")
    assert shards_and_manifest(tmp_path / "chunks") == reference
    assert shards_and_manifest(tmp_path / "workers") == reference
    files = {os.path.basename(f["file"]): f["reviews"] for f in sequential["files"]}
    assert files == {name: n for name, n in {"big.json": 1500, "big.json.gz": 1500, "s.csv": 400, "t.txt": 300}.items()
                     if any(path.endswith("/" + name) for path in inputs)}


@pytest.mark.unit
def test_csv_is_cut_only_between_records(tmp_path):
    """Quoted newlines are never a cut; a stray quote makes the file one piece, read as csv would."""
    rows = io.StringIO()
    csv.writer(rows).writerows([["label", "sentence"]] + [[1, f'long "quoted"\nfield {i}\n' * 20] for i in range(50)])
    path = tmp_path / "q.csv"
    path.write_text(rows.getvalue())
    data = path.read_bytes()
    start = data.index(b"\n") + 1
    cuts = csv_boundaries(str(path), start, len(data), 1024)
    assert len(cuts) > 10 and cuts[-1] == len(data)
    for cut in cuts[1:-1]:  # each cut is a line end with the quotes before it paired up
        assert data[cut - 1:cut] == b"\n" and data[:cut].count(b'"') % 2 == 0
    manifest = preprocess([str(path)], str(tmp_path / "out"), 1, chunk_mb=0.001, **OPTS)
    expected = sorted(clean(r["sentence"]).encode() + b"\n" for r in csv.DictReader(io.StringIO(rows.getvalue())))
    assert sorted(records(tmp_path / "out")) == expected and manifest["skipped"] == {}
    stray = tmp_path / "stray.csv"
    stray.write_text('label,sentence\n1,he said "hi\n' + "".join(f"0,line {i}\n" for i in range(200)))
    data = stray.read_bytes()
    assert csv_boundaries(str(stray), data.index(b"\n") + 1, len(data), 1024) is None


@pytest.mark.unit
def test_formats_gzip_csv_text_and_auto(tmp_path):
    gz = tmp_path / "r.json.gz"
    with gzip.open(gz, "wt") as f:
        f.write(review_line("from gzip"))
        f.write("{'summary': 'Dict', 'reviewText': 'literal line'}\n")
    csv_path = tmp_path / "s.csv"
    csv_path.write_text('label,sentence\n1,"a, quoted sentence"\n0,plain one\n')
    csv_limit = csv.field_size_limit()
    txt = tmp_path / "t.txt"
    txt.write_text("first line doc\n\nsecond line doc\n")
    manifest = preprocess([str(gz), str(csv_path), str(txt)], str(tmp_path / "out"), 1, **OPTS)
    assert manifest["formats"] == ["amazon_json", "csv", "text"]
    assert csv.field_size_limit() == csv_limit  # process-wide: a later CSV read in this process keeps its limit
    assert sorted(records(tmp_path / "out")) == sorted([
        b"Nice. from gzip\n", b"Dict. literal line\n", b"a, quoted sentence\n", b"plain one\n",
        b"first line doc\n", b"second line doc\n"])
    whole = preprocess([str(txt)], str(tmp_path / "whole"), 1, fmt="text", **{**OPTS, "text_whole_file": True})
    assert records(tmp_path / "whole") == [b"first line doc second line doc\n"]
    assert sum(whole["splits"][s]["reviews"] for s in ("train", "val", "test")) == 1


@pytest.mark.unit
def test_skipped_records_are_counted_with_their_reason(tmp_path):
    p = tmp_path / "mixed.json"
    good = "".join(review_line(f"good review {i}") for i in range(97))
    p.write_bytes(good.encode() + b"{broken json\n" + b'{"summary": "x", "reviewText": "bad \xff byte"}\n'
                  + b'{"summary": "valid JSON", "text": "but no reviewText"}\n'
                  + b'{"reviewText": "a lone surrogate \\ud83d, escaped"}\n')
    manifest = preprocess([str(p)], str(tmp_path / "out"), 1, max_bad_fraction=0.05, **OPTS)
    assert manifest["skipped"] == {"malformed JSON": 1, "invalid UTF-8": 2, "no 'reviewText' field": 1}
    assert manifest["files"][0]["skipped"] == manifest["skipped"]
    assert len(records(tmp_path / "out")) == 97


def peak_rss_mb(cmd, logs) -> tuple[float, subprocess.CompletedProcess]:
    """Peak RSS of a command's process (os.wait4: that child alone, reaped here), and its output."""
    with open(logs / "stdout", "w+") as out, open(logs / "stderr", "w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return usage.ru_maxrss / 1024, subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


@pytest.mark.cli
def test_one_enormous_line_is_skipped_without_holding_it(tmp_path):
    """A 256 MB line (no newline) between reviews: skipped and counted, memory as for the reviews alone."""
    first, second = ("".join(review_line(f"review {i}") for i in range(k, k + 100)).encode() for k in (0, 100))
    good = first + second
    small, huge = tmp_path / "small.json", tmp_path / "huge.json"
    small.write_bytes(good)
    with open(huge, "wb") as f:
        f.write(first)
        for _ in range(256):
            f.write(b'{"reviewText": "' + b"x" * (1 << 20))
        f.write(b'"}\n' + second)
    huge_gz = tmp_path / "huge.json.gz"
    with open(huge, "rb") as src, gzip.open(huge_gz, "wb", compresslevel=1) as dst:
        while block := src.read(16 << 20):
            dst.write(block)
    flags = ["--num_shards=1", "--max_bad_fraction=0.01", "--min_eval_bytes=0"]
    baseline, proc = peak_rss_mb([*PREPROCESS, "--input", str(small), f"--output_dir={tmp_path}/o0", *flags],
                                 tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for i, path in enumerate([huge, huge_gz], 1):
        peak, proc = peak_rss_mb([*PREPROCESS, "--input", str(path), f"--output_dir={tmp_path}/o{i}", *flags],
                                 tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        manifest = json.loads((tmp_path / f"o{i}" / "manifest.json").read_text())
        assert manifest["skipped"] == {"longer than --max_record_bytes=16777216": 1}
        assert sorted(records(tmp_path / f"o{i}")) == sorted(records(tmp_path / "o0"))
        assert peak - baseline < 100, f"{path.name}: peak RSS {peak:.0f} MB vs {baseline:.0f} MB without the line"
    huge.unlink()
    proc = python(*PREPROCESS[1:], "--input", str(small), f"--output_dir={tmp_path}/o3", "--format=text",
                  "--text_whole_file", "--max_record_bytes=2048")
    assert proc.returncode != 0
    assert last_line(proc.stderr).startswith(f"error: {small}: {len(good):,} bytes, more than --max_record_bytes=2048")


@pytest.mark.cli
def test_a_small_corpus_gets_eval_splits_that_train(tmp_path, shared_dir):
    """1,000 real reviews with the default fractions: val and test reach --min_eval_bytes; training runs."""
    source = shared_dir / "data" / "amazon" / "reviews_Musical_Instruments_5.json.gz"
    with gzip.open(source, "rt") as f:
        lines = [next(f) for _ in range(1000)]
    (tmp_path / "r.json").write_text("".join(lines))
    manifest = preprocess([str(tmp_path / "r.json")], str(tmp_path / "out"), 8, progress=False)
    assert manifest["requested_fractions"] == [0.001, 0.001] and manifest["min_eval_bytes"] == 32768
    assert 0.001 < manifest["val_fraction"] <= 0.1 and 0.001 < manifest["test_fraction"] <= 0.1
    for split in ("val", "test"):
        assert manifest["splits"][split]["bytes"] >= 32768
    assert manifest["splits"]["train"]["bytes"] > 0.75 * sum(manifest["splits"][s]["bytes"] for s in manifest["splits"])
    for r in records(tmp_path / "out", "val"):
        assert assign(r, manifest["val_fraction"], manifest["test_fraction"])[0] == "val"
    kept = preprocess([str(tmp_path / "r.json")], str(tmp_path / "kept"), 8, min_eval_bytes=0, progress=False)
    assert kept["val_fraction"] == 0.001 and kept["splits"]["val"]["bytes"] < 2000
    # cpu_demo's data shape (32 streams of 128 bytes for training and validation), a tiny model
    run = python("train.py", f"--data_dir={tmp_path}/out", f"--model_dir={tmp_path}/model", "--train_steps=2",
                 *TINY_MODEL_FLAGS, "--batch_size_per_worker=32", "--seq_length=128", "--warmup_steps=1",
                 "--eval_every=2", "--eval_windows=1")
    assert run.returncode == 0, run.stderr[-2000:]


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
    if kind in ("twice", "twice_by_link"):  # a glob and a name, or a link: the same reviews twice
        (tmp_path / "r.json").write_text(review_line("once"))
        if kind == "twice":
            return [str(tmp_path / "r.json")] * 2
        (tmp_path / "link.json").symlink_to(tmp_path / "r.json")
        return [str(tmp_path / "r.json"), str(tmp_path / "link.json")]
    if kind == "directory":
        (tmp_path / "reviews").mkdir()
        return str(tmp_path / "reviews")
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


@pytest.mark.unit
@pytest.mark.parametrize("kind, message", [
    ("missing", r"nope.json: no such file$"),
    ("twice", r"r.json: given twice; each input file once$"),
    ("twice_by_link", r"link.json: given twice \(it is .*/r.json\); each input file once$"),
    ("directory", r"reviews: is a directory \(give the files in it"),
    ("empty", "no usable records"),
    ("truncated_gz", r"cut.json.gz:\d+: truncated or corrupt gzip"),
    ("too_many_bad", r"5 of 6 records were skipped \(5 malformed JSON\), more than --max_bad_fraction"),
    ("no_column", "nocol.csv:1: no column 'sentence'"),
])
def test_fatal_input_keeps_previous_output(tmp_path, good_output, kind, message):
    out, before = good_output
    with pytest.raises(PreprocessError, match=message):
        bad = write_bad(tmp_path, kind)
        preprocess(bad if isinstance(bad, list) else [bad], str(out), 1, **OPTS)
    assert tree(out) == before
    assert not [n for n in os.listdir(out) if n.startswith(".staging-")]  # no staging dir left


@pytest.mark.unit
@pytest.mark.parametrize("flag, message", [
    ("--workers=-3", "--workers must be at least 1, got -3"),
    ("--workers=0", "--workers must be at least 1, got 0"),
    ("--max_bad_fraction=-1", "--max_bad_fraction must be from 0 to 1, got -1.0"),
    ("--max_bad_fraction=1.5", "--max_bad_fraction must be from 0 to 1, got 1.5"),
    ("--num_shards=0", "--num_shards must be at least 1, got 0"),
    ("--chunk_mb=0", "--chunk_mb must be at least 0.001 (1 KB), got 0.0"),
    ("--max_record_bytes=100", "--max_record_bytes must be at least 1024, got 100"),
    ("--min_eval_bytes=-1", "--min_eval_bytes must be >= 0, got -1"),
    ("--val_fraction=1", "--val_fraction and --test_fraction must be >= 0 and sum to less than 1"),
])
def test_bad_flags_are_one_line(tmp_path, flag, message):
    """The command line's flags as parsed by absl, checked before any input is read or output made."""
    src = tmp_path / "r.json"
    src.write_text(review_line("a review"))
    parsed = flags.FlagValues()
    define_flags(parsed)
    argv = parsed(["preprocess", "--input", str(src), f"--output_dir={tmp_path}/out", flag])
    with pytest.raises(PreprocessError) as caught:
        preprocess(**arguments(parsed, argv), progress=False)
    assert str(caught.value) == message
    assert not (tmp_path / "out").exists()


@pytest.mark.unit
def test_far_too_many_shards_are_refused_before_any_is_written(tmp_path, good_output):
    out, before = good_output
    src = tmp_path / "r.json"
    src.write_text("".join(review_line(f"review {i}") for i in range(3000)))
    with pytest.raises(PreprocessError, match=r"--num_shards=100000 is more than the 3,000 reviews, so most of the "
                                              r"300,000 shard files would be empty"):
        preprocess([str(src)], str(out), 100000, **OPTS)
    assert tree(out) == before and len(os.listdir(out)) == 3  # .lock, manifest.json, the old shards


@pytest.mark.unit
def test_an_overlong_csv_line_is_named_by_its_line_number(tmp_path, good_output):
    out, before = good_output
    path = tmp_path / "long.csv"
    path.write_text("label,sentence\n" + "1,fine\n" * 30 + "0," + "y" * 5000 + "\n" + "1,after\n")
    with pytest.raises(PreprocessError, match=rf"^{path}:32: a line longer than --max_record_bytes=1024"):
        preprocess([str(path)], str(out), 1, max_record_bytes=1024, chunk_mb=0.001, **OPTS)
    assert tree(out) == before


@pytest.mark.multiproc
@pytest.mark.parametrize("signum, status, workers", [(signal.SIGTERM, 143, 1), (signal.SIGINT, 130, 2)])
def test_a_signal_stops_cleanly_and_keeps_the_previous_output(tmp_path, good_output, signum, status, workers):
    out, before = good_output
    src = tmp_path / "many.json"
    src.write_text("".join(review_line(f"review {i} " + "text " * 50) for i in range(60000)))  # ~20 MB
    proc = subprocess.Popen([*PREPROCESS, "--input", str(src), f"--output_dir={out}", f"--workers={workers}",
                             "--chunk_mb=0.5", "--num_shards=1"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(out.glob(".staging-*/chunk-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # stop it once it has written something
    assert proc.poll() is None, "preprocess finished before it could be stopped"
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr[-2000:]
    name = signal.Signals(signum).name
    assert last_line(stderr) == f"error: stopped by {name}; nothing was published, {out} keeps its previous output"
    assert "Traceback" not in stderr
    assert tree(out) == before and not list(out.glob(".staging-*"))


@pytest.mark.multiproc
def test_a_killed_worker_is_one_line_naming_the_file(tmp_path, good_output):
    out, before = good_output
    src = tmp_path / "many.json"
    src.write_text("".join(review_line(f"review {i} " + "text " * 50) for i in range(60000)))  # ~20 MB
    proc = subprocess.Popen([*PREPROCESS, "--input", str(src), f"--output_dir={out}", "--workers=2",
                             "--chunk_mb=0.5", "--num_shards=1"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(out.glob(".staging-*/chunk-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = [int(pid) for pid in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
               if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
    assert len(workers) == 2 and proc.poll() is None
    os.kill(workers[0], signal.SIGKILL)  # as the OOM killer would
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in stderr
    assert last_line(stderr) == (f"error: {src}: a worker process died on it (killed, or out of memory: lower "
                                 "--workers or --chunk_mb)")
    assert tree(out) == before and not list(out.glob(".staging-*"))


@pytest.mark.cli
def test_cli_success_and_one_line_failure(tmp_path):
    src = tmp_path / "r.json"
    src.write_text("".join(review_line(f"cli review {i}") for i in range(30)))
    other = tmp_path / "r2.json"
    other.write_text(review_line("second file"))
    proc = python(*PREPROCESS[1:], "--input", str(src), str(other), f"--output_dir={tmp_path}/out", "--num_shards=2",
                  check=True)
    final = last_line(proc.stdout)
    assert final.startswith(f"[preprocess] {tmp_path}/out: 31 reviews, ") and "MB/s; skipped 0 (none)" in final
    assert "B/s" in proc.stderr and "all files read" in proc.stderr  # tqdm's rate by bytes, and where it is
    assert sum(s.bytes for s in split_shards(str(tmp_path / "out"), "train")) > 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["command"].count("r.json") == 1
    proc = python(*PREPROCESS[1:], "--input", str(tmp_path / "missing.json"), f"--output_dir={tmp_path}/out2")
    assert proc.returncode != 0 and last_line(proc.stderr) == f"error: {tmp_path}/missing.json: no such file"
    proc = python(*PREPROCESS[1:], "--input", str(src), f"--output_dir={tmp_path}/out3", "--workers=0")
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --workers must be at least 1, got 0"
    assert not (tmp_path / "out3").exists()
