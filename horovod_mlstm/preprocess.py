"""Review files -> cleaned, framed documents -> train/val/test TFRecord shards + manifest.json.

    python -m horovod_mlstm.preprocess --input reviews/*.json.gz --output_dir data/amazon --num_shards 128

Each document is cleaned as the reference implementations did (HTML entities unescaped,
tags stripped, whitespace folded), encoded as UTF-8 and framed with data.DOC_END so the
model sees where reviews end. The split of a document is a stable hash of its bytes, so
rerunning gives the same split and adding input files moves no old review between splits.

Input files are read as streams (memory stays bounded) by `--workers` processes, each
writing per-file parts into a private temporary directory. The shard of a document is a
hash of it too, and each shard is its parts concatenated in input order (TFRecord files
concatenate), so the output does not depend on --workers and merging is a file copy.
Only when everything succeeded do the shards and manifest replace those in --output_dir:
a fatal error leaves the previous output as it was.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import html
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import zlib

from absl import app, flags, logging

from horovod_mlstm import corpus
from horovod_mlstm.data import DOC_END, SPLITS, shard_name

FORMATS = ("auto", "amazon_json", "csv", "text")
_TAG = re.compile(r"<[^>]{0,200}>")
_SPACE = re.compile(r"\s+")
_BAD_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by surrogateescape


class PreprocessError(Exception):
    """A fatal input problem, explained in one line naming the file (and line)."""


def clean(text: str) -> str:
    """Unescape HTML entities, strip tags, fold all whitespace (newlines too) to one space."""
    return _SPACE.sub(" ", _TAG.sub(" ", html.unescape(text))).strip()


def assign(document: bytes, val_fraction: float, test_fraction: float, num_shards: int = 1) -> tuple[str, int]:
    """(split, shard) of a document, from a hash of its bytes: stable across runs, inputs and workers."""
    digest = hashlib.blake2b(document, digest_size=16).digest()
    h = int.from_bytes(digest[:8], "big") / 2.0**64
    split = "val" if h < val_fraction else "test" if h < val_fraction + test_fraction else "train"
    return split, int.from_bytes(digest[8:], "big") % num_shards


def split_of(document: bytes, val_fraction: float, test_fraction: float) -> str:
    return assign(document, val_fraction, test_fraction)[0]


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
    parts = PartWriter(tmp, f"part-{index:06d}", options["num_shards"])
    counts = {"file": path, "format": fmt, "skipped": {}}
    number = 0
    try:
        for number, text, reason in documents(path, fmt, options):
            if text is not None and _BAD_UTF8.search(text):
                text, reason = None, "invalid UTF-8"
            if text is not None:
                text = clean(text)
                if not text:
                    text, reason = None, "empty text"
            if text is None:
                counts["skipped"][reason] = counts["skipped"].get(reason, 0) + 1
                continue
            record = text.encode("utf-8") + DOC_END
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


# ---------------------------------------------------------------- writing shards

class PartWriter:
    """TFRecord files `{prefix}-{split}-{shard}`, opened on first use, with per-shard counts."""

    def __init__(self, directory: str, prefix: str, num_shards: int):
        self.directory, self.prefix = directory, prefix
        self.writers = {}
        self.records = {s: [0] * num_shards for s in SPLITS}
        self.bytes = {s: [0] * num_shards for s in SPLITS}

    def path(self, split: str, shard: int) -> str:
        return os.path.join(self.directory, f"{self.prefix}-{split}-{shard:05d}")

    def write(self, record: bytes, split: str, shard: int) -> None:
        if (split, shard) not in self.writers:
            import tensorflow as tf  # here, so workers import it after starting

            self.writers[split, shard] = tf.io.TFRecordWriter(self.path(split, shard))
        self.writers[split, shard].write(record)
        self.records[split][shard] += 1
        self.bytes[split][shard] += len(record)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def merge_parts(tmp: str, prefixes: list[str], num_shards: int) -> None:
    """Final shards = their parts concatenated in input order (TFRecord files concatenate)."""
    for split in SPLITS:
        for shard in range(num_shards):
            with open(os.path.join(tmp, shard_name(split, shard, num_shards)), "wb") as out:
                for prefix in prefixes:
                    part = os.path.join(tmp, f"{prefix}-{split}-{shard:05d}")
                    if os.path.exists(part):
                        with open(part, "rb") as f:
                            shutil.copyfileobj(f, out, 16 << 20)
                        os.remove(part)


def splits_manifest(records: dict, nbytes: dict, num_shards: int) -> dict:
    return {s: {"reviews": sum(records[s]), "bytes": sum(nbytes[s]),
                "shards": [{"file": shard_name(s, i, num_shards), "reviews": records[s][i], "bytes": nbytes[s][i]}
                           for i in range(num_shards)]}
            for s in SPLITS}


def publish(tmp: str, output_dir: str, manifest: dict) -> None:
    """Moves finished shards and the manifest from `tmp` into `output_dir`, replacing old shards."""
    manifest_tmp = os.path.join(tmp, "manifest.json")
    with open(manifest_tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):
        if name == "manifest.json" or (name.endswith(".tfrecord") and name.split("-")[0] in SPLITS):
            os.remove(os.path.join(output_dir, name))
    for name in sorted(os.listdir(tmp)):
        if name.endswith(".tfrecord"):
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    os.replace(manifest_tmp, os.path.join(output_dir, "manifest.json"))  # last: marks the output complete


def write_corpus(texts, output_dir: str, num_shards: int = 1, val_fraction: float = 0.001,
                 test_fraction: float = 0.001, extra_manifest: dict | None = None) -> dict:
    """Cleans, frames, splits and shards an iterable of texts (one process); returns the manifest."""
    tmp = tempfile.mkdtemp(prefix=".preprocess-", dir=os.path.dirname(os.path.abspath(output_dir)) or ".")
    try:
        parts = PartWriter(tmp, "part", num_shards)
        skipped = {}
        for text in texts:
            text = clean(text)
            if not text:
                skipped["empty text"] = skipped.get("empty text", 0) + 1
                continue
            record = text.encode("utf-8") + DOC_END
            parts.write(record, *assign(record, val_fraction, test_fraction, num_shards))
        parts.close()
        merge_parts(tmp, ["part"], num_shards)
        manifest = {"splits": splits_manifest(parts.records, parts.bytes, num_shards), "skipped": skipped,
                    "val_fraction": val_fraction, "test_fraction": test_fraction,
                    "command": " ".join(sys.argv), **(extra_manifest or {})}
        publish(tmp, output_dir, manifest)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".preprocess-", dir=parent)
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
        merge_parts(tmp, [f"part-{job[0]:06d}" for job in jobs], num_shards)
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


BUILTIN_REVIEWS = 20000


def prepare_builtin(output_dir: str) -> str:
    """Writes the built-in corpus once (about 5 MB); later calls find it and return.

    Safe for every rank to call at once: each writes a private directory and renames it into
    place; whoever loses the race drops its copy (the corpus is deterministic).
    """
    if os.path.exists(os.path.join(output_dir, "manifest.json")):
        return output_dir
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".builtin-", dir=parent)
    try:
        write_corpus(corpus.texts(BUILTIN_REVIEWS), tmp, num_shards=2, val_fraction=0.05,
                     test_fraction=0.05, extra_manifest={"formats": ["builtin"]})
        os.rename(tmp, output_dir)
    except OSError:
        if not os.path.exists(os.path.join(output_dir, "manifest.json")):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def main(argv):
    FLAGS = flags.FLAGS
    inputs = (FLAGS.input or []) + argv[1:]  # `--input a b c`: the shell's expansion of one glob
    if FLAGS.builtin:
        prepare_builtin(FLAGS.output_dir)
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
    except PreprocessError as e:
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
