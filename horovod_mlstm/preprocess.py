"""Review files -> cleaned, framed documents -> train/val/test TFRecord shards + manifest.json.

    python -m horovod_mlstm.preprocess --input reviews/*.json.gz --output_dir data/amazon --num_shards 128

Each document is cleaned as the reference implementations did (HTML entities unescaped,
tags stripped, whitespace folded), encoded as UTF-8 and framed with records.DOC_END so the
model sees where reviews end. The split of a document is a stable hash of its bytes, so
rerunning gives the same split and adding input files moves no old review between splits.

Input files are read as streams (memory stays bounded) by `--workers` processes, each
writing per-file parts into a private staging directory. The shard of a document is a
hash of it too, and each shard is its parts concatenated in input order (TFRecord files
concatenate), so the output does not depend on --workers and merging is a file copy.
Only when everything succeeded are the shards and manifest published (records.publish,
atomic): a fatal error or a kill leaves the previous output as it was.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import zlib

from absl import app, flags, logging

from horovod_mlstm import corpus
from horovod_mlstm.records import (SPLITS, DataError, ShardWriter, assign, concatenate_parts, frame, make_staging,
                                   publish, splits_manifest)

FORMATS = ("auto", "amazon_json", "csv", "text")
_BAD_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by surrogateescape


class PreprocessError(Exception):
    """A fatal input problem, explained in one line naming the file (and line)."""


# ---------------------------------------------------------------- reading inputs

def open_text(path: str):
    """A text stream over a plain or gzip file; bytes that are not UTF-8 survive as surrogates."""
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")


def detect_format(path: str) -> str:
    """amazon_json, csv or text, from the file name and its first non-empty line."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".csv"):
        return "csv"
    with open_text(path) as f:
        first = next((line for line in f if line.strip()), "")
    if first.lstrip().startswith("{"):
        return "amazon_json"
    return "text"


def parse_review(line: str, text_field: str) -> str | None:
    """The text of one McAuley review line ("summary. reviewText"); None if malformed."""
    try:
        review = json.loads(line)
    except json.JSONDecodeError:
        try:  # the older dumps are Python dict literals, one per line
            review = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    if not isinstance(review, dict) or not isinstance(review.get(text_field), str):
        return None
    summary = review.get("summary")
    return f"{summary}. {review[text_field]}" if isinstance(summary, str) and summary.strip() else review[text_field]


def documents(path: str, fmt: str, options: dict):
    """Yields (line number, text or None if malformed, reason) for every record of one file."""
    with open_text(path) as f:
        if fmt == "csv":
            reader = csv.DictReader(f)
            column = options["csv_column"]
            if column not in (reader.fieldnames or []):
                raise PreprocessError(f"{path}:1: no column {column!r} (columns: {', '.join(reader.fieldnames or [])})")
            for row in reader:
                text = row.get(column)
                yield reader.line_num, text, None if text is not None else "short CSV row"
        elif fmt == "text" and options["text_whole_file"]:
            yield 1, f.read(), None
        else:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if fmt == "text":
                    yield number, line, None
                else:
                    text = parse_review(line, options["text_field"])
                    yield number, text, None if text is not None else "malformed JSON"


def process_file(job):
    """Worker: one input file -> TFRecord parts per (split, shard) in the temp dir; returns its counts."""
    index, path, fmt, options, tmp = job
    parts = ShardWriter(tmp, f"part-{index:06d}", options["num_shards"])
    counts = {"file": path, "format": fmt, "skipped": {}}
    number = 0
    try:
        for number, text, reason in documents(path, fmt, options):
            if text is not None and _BAD_UTF8.search(text):
                text, reason = None, "invalid UTF-8"
            record = frame(text) if text is not None else None
            if text is not None and record is None:
                reason = "empty text"
            if record is None:
                counts["skipped"][reason] = counts["skipped"].get(reason, 0) + 1
                continue
            parts.write(record, *assign(record, options["val_fraction"], options["test_fraction"],
                                        options["num_shards"]))
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise PreprocessError(f"{path}:{number + 1}: truncated or corrupt gzip ({e})") from None
    except csv.Error as e:
        raise PreprocessError(f"{path}:{number + 1}: malformed CSV ({e})") from None
    finally:
        parts.close()
    counts.update(records=parts.records, bytes=parts.bytes)
    return counts


def preprocess(inputs: list[str], output_dir: str, num_shards: int, fmt: str = "auto", workers: int = 1,
               max_bad_fraction: float = 0.01, **options) -> dict:
    """The CLI's work: check inputs, process files in parallel, merge into shards, publish."""
    from tqdm import tqdm

    for path in inputs:
        if not os.path.isfile(path):
            raise PreprocessError(f"{path}: no such file")
    if not inputs:
        raise PreprocessError("no input files given")
    formats = []
    for path in inputs:
        try:
            chosen = detect_format(path) if fmt == "auto" else fmt
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise PreprocessError(f"{path}:1: truncated or corrupt gzip ({e})") from None
        if fmt == "auto":
            logging.info("%s: format %s (auto)", path, chosen)
        formats.append(chosen)
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    tmp = make_staging(output_dir)
    try:
        jobs = [(i, p, f, {**options, "num_shards": num_shards}, tmp) for i, (p, f) in enumerate(zip(inputs, formats))]
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr) as bar:
            if workers > 1:
                with multiprocessing.get_context("spawn").Pool(workers) as pool:
                    results = []
                    for counts in pool.imap(process_file, jobs):
                        results.append(counts)
                        bar.update(os.path.getsize(counts["file"]))
            else:
                results = []
                for job in jobs:
                    results.append(process_file(job))
                    bar.update(os.path.getsize(job[1]))
        good = sum(sum(map(sum, r["records"].values())) for r in results)
        skipped = {}
        for r in results:
            for reason, n in r["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        bad = sum(skipped.values())
        if good == 0:
            raise PreprocessError(f"{', '.join(inputs)}: no usable records (skipped: {skipped or 'none'})")
        if bad / (good + bad) > max_bad_fraction:
            raise PreprocessError(f"{bad} of {good + bad} records are malformed ({skipped}), more than "
                                  f"--max_bad_fraction={max_bad_fraction}")
        concatenate_parts(tmp, [f"part-{job[0]:06d}" for job in jobs], num_shards)
        records = {s: [sum(r["records"][s][i] for r in results) for i in range(num_shards)] for s in SPLITS}
        nbytes = {s: [sum(r["bytes"][s][i] for r in results) for i in range(num_shards)] for s in SPLITS}
        manifest = {
            "splits": splits_manifest(records, nbytes, num_shards),
            "formats": sorted(set(formats)),
            "files": [{"file": r["file"], "format": r["format"], "reviews": sum(map(sum, r["records"].values())),
                       "skipped": r["skipped"]} for r in results],
            "skipped": skipped,
            "val_fraction": options["val_fraction"], "test_fraction": options["test_fraction"],
            "command": " ".join(sys.argv),
        }
        publish(tmp, output_dir, manifest)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv):
    FLAGS = flags.FLAGS
    inputs = (FLAGS.input or []) + argv[1:]  # `--input a b c`: the shell's expansion of one glob
    if FLAGS.builtin:
        corpus.prepare_builtin(FLAGS.output_dir)
        print(f"[preprocess] built-in corpus in {FLAGS.output_dir}")
        return
    if FLAGS.num_shards < 1:
        sys.exit("error: --num_shards must be at least 1")
    if not (0 <= FLAGS.val_fraction and 0 <= FLAGS.test_fraction and FLAGS.val_fraction + FLAGS.test_fraction < 1):
        sys.exit("error: --val_fraction and --test_fraction must be >= 0 and sum to less than 1")
    try:
        manifest = preprocess(inputs, FLAGS.output_dir, FLAGS.num_shards, FLAGS.format, FLAGS.workers,
                              FLAGS.max_bad_fraction, text_field=FLAGS.text_field, csv_column=FLAGS.csv_column,
                              text_whole_file=FLAGS.text_whole_file, val_fraction=FLAGS.val_fraction,
                              test_fraction=FLAGS.test_fraction)
    except (PreprocessError, DataError) as e:
        sys.exit(f"error: {e}")
    splits = manifest["splits"]
    print(f"[preprocess] {FLAGS.output_dir}: " + ", ".join(
        f"{s} {splits[s]['reviews']:,} reviews / {splits[s]['bytes']:,} bytes" for s in SPLITS)
        + f" in {FLAGS.num_shards} shard(s) each; skipped {manifest['skipped'] or 'none'}", flush=True)


if __name__ == "__main__":
    flags.DEFINE_multi_string("input", None, "Input files (repeat the flag, or list them after one --input).")
    flags.DEFINE_string("output_dir", "data/reviews", "Where the shards and manifest.json go.")
    flags.DEFINE_integer("num_shards", 8, "Shards per split (use at least the number of training ranks).")
    flags.DEFINE_enum("format", "auto", list(FORMATS), "Input format; auto decides per file.")
    flags.DEFINE_string("text_field", "reviewText", "amazon_json: the field holding the review text.")
    flags.DEFINE_string("csv_column", "sentence", "csv: the column holding the text.")
    flags.DEFINE_bool("text_whole_file", False, "text: each file is one document (default: one per line).")
    flags.DEFINE_float("val_fraction", 0.001, "Share of reviews in the validation split.")
    flags.DEFINE_float("test_fraction", 0.001, "Share of reviews in the test split.")
    flags.DEFINE_integer("workers", 1, "Processes reading input files in parallel.")
    flags.DEFINE_float("max_bad_fraction", 0.01, "Stop with an error when more records than this are malformed.")
    flags.DEFINE_bool("builtin", False, "Write the built-in synthetic corpus instead of reading --input.")
    app.run(main)
