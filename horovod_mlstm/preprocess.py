"""Review text -> cleaned, framed documents -> train/val/test TFRecord shards + manifest.json.

Each document is cleaned as the reference implementations did (HTML entities unescaped,
tags stripped, whitespace folded), encoded as UTF-8 and framed with data.DOC_END so the
model sees where reviews end. The split of a document is a stable hash of its text, so
rerunning gives the same split and adding input files moves no old review between splits.
Shards are written to temporary names and renamed only when complete.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import sys
import tempfile

from horovod_mlstm import corpus
from horovod_mlstm.data import DOC_END, SPLITS, shard_name

_TAG = re.compile(r"<[^>]{0,200}>")
_SPACE = re.compile(r"\s+")


def clean(text: str) -> str:
    """Unescape HTML entities, strip tags, fold all whitespace (newlines too) to one space."""
    return _SPACE.sub(" ", _TAG.sub(" ", html.unescape(text))).strip()


def split_of(document: bytes, val_fraction: float, test_fraction: float) -> str:
    """train, val or test, from a hash of the document's bytes (stable across runs and inputs)."""
    h = int.from_bytes(hashlib.blake2b(document, digest_size=8).digest(), "big") / 2.0**64
    if h < val_fraction:
        return "val"
    if h < val_fraction + test_fraction:
        return "test"
    return "train"


class ShardWriter:
    """Round-robin writer for one split's shards; files appear under their final names only on close()."""

    def __init__(self, output_dir: str, split: str, num_shards: int):
        import tensorflow as tf  # imported here so `--help` and cleaning stay fast

        self.paths = [os.path.join(output_dir, shard_name(split, i, num_shards)) for i in range(num_shards)]
        self.writers = [tf.io.TFRecordWriter(p + ".tmp") for p in self.paths]
        self.records = [0] * num_shards
        self.bytes = [0] * num_shards
        self._next = 0

    def write(self, record: bytes) -> None:
        i = self._next
        self.writers[i].write(record)
        self.records[i] += 1
        self.bytes[i] += len(record)
        self._next = (i + 1) % len(self.writers)

    def close(self) -> None:
        for w, p in zip(self.writers, self.paths):
            w.close()
            os.replace(p + ".tmp", p)

    def abort(self) -> None:
        for w, p in zip(self.writers, self.paths):
            w.close()
            if os.path.exists(p + ".tmp"):
                os.remove(p + ".tmp")


def write_corpus(texts, output_dir: str, num_shards: int = 1, val_fraction: float = 0.001,
                 test_fraction: float = 0.001, extra_manifest: dict | None = None) -> dict:
    """Cleans, frames, splits and shards an iterable of texts; returns the manifest it wrote."""
    os.makedirs(output_dir, exist_ok=True)
    writers = {s: ShardWriter(output_dir, s, num_shards) for s in SPLITS}
    skipped = {"empty": 0}
    try:
        for text in texts:
            text = clean(text)
            if not text:
                skipped["empty"] += 1
                continue
            record = text.encode("utf-8") + DOC_END
            writers[split_of(record, val_fraction, test_fraction)].write(record)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    manifest = {
        "splits": {s: {"reviews": sum(w.records), "bytes": sum(w.bytes),
                       "shards": [{"file": os.path.basename(p), "reviews": r, "bytes": b}
                                  for p, r, b in zip(w.paths, w.records, w.bytes)]}
                   for s, w in writers.items()},
        "skipped": skipped,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "command": " ".join(sys.argv),
        **(extra_manifest or {}),
    }
    tmp = os.path.join(output_dir, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(output_dir, "manifest.json"))
    return manifest


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
