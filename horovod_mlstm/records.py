"""The on-disk corpus: documents framed as TFRecords in shards, listed by manifest.json.

A data directory holds `manifest.json` and, in a subdirectory named in it, the shards:

    DIR/manifest.json                                  the pointer: what is published
    DIR/shards-<run>/{train,val,test}-NNNNN-of-MMMMM.tfrecord

The manifest lists every shard with its record and byte counts. Readers open only what the
manifest lists and check each file's size against it, so a half-written or foreign shard
is an error, never silently less data.

Publishing is atomic and serialised: a run writes its shards into a private staging
directory inside DIR, then, holding DIR/.lock, renames it to `shards-<run>`, replaces
manifest.json with one rename, and only then removes what the replaced manifest listed. A run
killed at any point leaves either the previous output or the new one, complete; two runs
into one DIR leave one run's complete output. Publishing removes only files a manifest listed,
never anything else in DIR.

A run owns its staging directory by holding an flock on the `.owner` file in it for as long as
it lives; the kernel drops the lock when the process dies, however it dies. So the next run
removes exactly the staging directories whose lock is free, whatever the host, container or
pid namespace of their owner (on NFS, Linux turns flock into NFS locks, which other hosts see).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import hashlib
import html
import json
import os
import re
import shutil
import uuid

import crc32c

from horovod_mlstm.files import NotWritable, make_dir, replace_whole, write_json

SPLITS = ("train", "val", "test")
DOC_END = b"\n"  # every review is framed as cleaned text + DOC_END (whitespace inside is folded)
MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
RECORD_OVERHEAD = 16  # a TFRecord frames each record with a length (8), its CRC (4) and a data CRC (4)
_TAG = re.compile(r"<[^>]{0,200}>")
_STAGING = ".staging-"
_OWNER = ".owner"  # in a staging directory: its run holds an flock on it while it lives
_owned: dict[str, int] = {}  # staging directory -> the descriptor holding its owner lock, in this process


class DataError(Exception):
    """A problem with a data directory or its files, explained in one line."""


# ---------------------------------------------------------------- documents

def clean(text: str) -> str:
    """Unescape HTML entities, strip tags, fold all whitespace (newlines too) to one space.

    str.split() splits on exactly the characters the regex \\s matches (both ask Py_UNICODE_ISSPACE), and is
    ~10x faster than substituting runs of them, which cost most of preprocessing's time.
    """
    return " ".join(_TAG.sub(" ", html.unescape(text)).split())


def frame(text: str) -> bytes | None:
    """A text as a record: cleaned, UTF-8, ended by DOC_END; None when nothing is left."""
    text = clean(text)
    return text.encode("utf-8") + DOC_END if text else None


def split_position(record: bytes) -> tuple[float, int]:
    """(h in [0, 1), n) from a hash of a record's bytes: `assign` puts it in val when h < val_fraction,
    and in shard n % num_shards. Public so a preprocessor can size the splits before choosing fractions."""
    digest = hashlib.blake2b(record, digest_size=16).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64, int.from_bytes(digest[8:], "big")


def split_at(position: float, val_fraction: float, test_fraction: float) -> str:
    """The split of a record whose split_position is `position`."""
    return "val" if position < val_fraction else "test" if position < val_fraction + test_fraction else "train"


def assign(record: bytes, val_fraction: float, test_fraction: float, num_shards: int = 1) -> tuple[str, int]:
    """(split, shard) of a record, from a hash of its bytes: stable across runs, inputs and workers."""
    h, n = split_position(record)
    return split_at(h, val_fraction, test_fraction), n % num_shards


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


# ---------------------------------------------------------------- writing shards

def _masked_crc(data: bytes) -> bytes:
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits plus a constant, little-endian."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF).to_bytes(4, "little")


def write_tfrecords(f, records) -> None:
    """Writes records to a binary file as tf.io.TFRecordWriter does (length, its checksum, data, its checksum),
    without importing TensorFlow, which costs a process ~6 CPU s and ~450 MB."""
    for record in records:
        length = len(record).to_bytes(8, "little")
        f.write(length + _masked_crc(length))
        f.write(record)
        f.write(_masked_crc(record))


class ShardWriter:
    """TFRecord files `{prefix}-{split}-{shard}` in a directory, opened on first use, with counts."""

    def __init__(self, directory: str, prefix: str, num_shards: int):
        self.directory, self.prefix = directory, prefix
        self.writers = {}
        self.records = {s: [0] * num_shards for s in SPLITS}
        self.bytes = {s: [0] * num_shards for s in SPLITS}

    def path(self, split: str, shard: int) -> str:
        return os.path.join(self.directory, f"{self.prefix}-{split}-{shard:05d}")

    def write(self, record: bytes, split: str, shard: int) -> None:
        if (split, shard) not in self.writers:
            self.writers[split, shard] = open(self.path(split, shard), "wb")
        write_tfrecords(self.writers[split, shard], [record])
        self.records[split][shard] += 1
        self.bytes[split][shard] += len(record)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def concatenate_parts(directory: str, prefixes: list[str], num_shards: int) -> None:
    """Final shards = their parts concatenated in `prefixes` order (TFRecord files concatenate)."""
    for split in SPLITS:
        for shard in range(num_shards):
            with replace_whole(os.path.join(directory, shard_name(split, shard, num_shards)), "wb") as out:
                for prefix in prefixes:
                    part = os.path.join(directory, f"{prefix}-{split}-{shard:05d}")
                    if os.path.exists(part):
                        with open(part, "rb") as f:
                            shutil.copyfileobj(f, out, 16 << 20)
                        os.remove(part)


def splits_manifest(records: dict, nbytes: dict, num_shards: int) -> dict:
    """The manifest's "splits": reviews and bytes per split and per shard (file names unprefixed)."""
    return {s: {"reviews": sum(records[s]), "bytes": sum(nbytes[s]),
                "shards": [{"file": shard_name(s, i, num_shards), "reviews": records[s][i], "bytes": nbytes[s][i]}
                           for i in range(num_shards)]}
            for s in SPLITS}


# ---------------------------------------------------------------- publishing

def _lock_is_free(path: str) -> bool:
    """Whether nobody holds an flock on PATH (a missing file counts as free); False when it cannot be told."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # held by a live run (EWOULDBLOCK), or locks unsupported here: leave it alone
        return False
    finally:
        os.close(fd)


def remove_dead_staging(output_dir: str) -> list[str]:
    """Removes the staging directories in output_dir whose run is gone (its owner lock is free); returns them.

    Called holding output_dir's lock, under which make_staging creates a directory and its lock together,
    so a directory without an owner file is never one being made: it was left by a run that died.
    """
    removed = []
    for path in sorted(glob.glob(os.path.join(output_dir, _STAGING + "*"))):
        if _lock_is_free(os.path.join(path, _OWNER)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def make_staging(output_dir: str) -> str:
    """A private directory inside output_dir for a run's shards (same filesystem: publish renames it).

    This process holds the lock on its owner file until remove_staging or publish, or until it dies.
    """
    try:
        make_dir(output_dir, "output directory")
    except NotWritable as e:
        raise DataError(str(e)) from None
    with locked(output_dir):
        remove_dead_staging(output_dir)
        while True:
            path = os.path.join(output_dir, f"{_STAGING}{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)
                break
        fd = os.open(os.path.join(path, _OWNER), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _owned[path] = fd
    return path


def _disown(staging: str) -> None:
    """Drops this process's claim on a staging directory (its owner file and lock)."""
    fd = _owned.pop(staging, None)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(staging, _OWNER))
    if fd is not None:
        os.close(fd)


def remove_staging(staging: str) -> None:
    """Removes a staging directory this process made (nothing if it was published) and drops its lock."""
    shutil.rmtree(staging, ignore_errors=True)
    _disown(staging)


@contextlib.contextmanager
def locked(output_dir: str):
    """Holds an exclusive lock on output_dir/.lock (flock: released by the kernel if we die)."""
    with open(os.path.join(output_dir, ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: str, output_dir: str, manifest: dict, replace: bool = True) -> bool:
    """Makes the shards in `staging` (from make_staging) output_dir's published data, atomically.

    `manifest["splits"]` names shard files relative to `staging`. With replace=False an output
    that is already published is kept and ours dropped (for identical, deterministic data).
    Returns whether ours was published.
    """
    name = "shards-" + os.path.basename(staging).rsplit("-", 1)[1]
    manifest = {"version": MANIFEST_VERSION, **manifest}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            shard["file"] = f"{name}/{shard['file']}"
    write_json(os.path.join(staging, MANIFEST), manifest)  # moves with the staging dir until the switch
    with locked(output_dir):
        if not replace and os.path.exists(os.path.join(output_dir, MANIFEST)):
            remove_staging(staging)
            return False
        superseded = _superseded(output_dir)
        _disown(staging)
        os.rename(staging, os.path.join(output_dir, name))
        # The one step that switches the output: before it the old output is whole, after it the new one.
        os.replace(os.path.join(output_dir, name, MANIFEST), os.path.join(output_dir, MANIFEST))
        _fsync_dir(output_dir)
        _remove([p for p in superseded if not p.startswith(os.path.join(output_dir, name, ""))], output_dir)
    return True


def _superseded(output_dir: str) -> list[str]:
    """What the next switch of the manifest leaves unused: the files the current manifest lists, and those of
    runs killed between placing their shards and switching (a shards-* directory still holding its manifest)."""
    paths = _listed(output_dir, os.path.join(output_dir, MANIFEST))
    for unswitched in glob.glob(os.path.join(output_dir, "shards-*", MANIFEST)):
        paths += _listed(output_dir, unswitched) + [unswitched]
    return paths


def _listed(data_dir: str, manifest_path: str) -> list[str]:
    """The shard files a manifest lists, each inside data_dir; none when it cannot be read as a manifest."""
    try:
        with open(manifest_path) as f:
            names = [shard["file"] for split in json.load(f)["splits"].values() for shard in split["shards"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [os.path.join(data_dir, name) for name in names if _inside(name)]


def _remove(paths: list[str], output_dir: str) -> None:
    """Removes files, then each of their directories below output_dir that is left empty."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.remove(path)
    for directory in sorted({os.path.dirname(p) for p in paths} - {output_dir}, key=len, reverse=True):
        with contextlib.suppress(OSError):  # not empty: it holds something no manifest listed
            os.rmdir(directory)


def _inside(name) -> bool:
    """Whether a manifest's shard name is a relative path that stays inside the data directory."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        return False
    parts = os.path.normpath(name).split(os.sep)
    return parts[0] not in ("..", ".")


def write_corpus(texts, output_dir: str, num_shards: int = 1, val_fraction: float = 0.001,
                 test_fraction: float = 0.001, extra_manifest: dict | None = None, replace: bool = True) -> dict:
    """Frames, splits, shards and publishes an iterable of texts (one process); returns the manifest."""
    staging = make_staging(output_dir)
    try:
        writer = ShardWriter(staging, "part", num_shards)
        skipped = {}
        for text in texts:
            record = frame(text)
            if record is None:
                skipped["empty text"] = skipped.get("empty text", 0) + 1
                continue
            writer.write(record, *assign(record, val_fraction, test_fraction, num_shards))
        writer.close()
        concatenate_parts(staging, ["part"], num_shards)
        manifest = {"splits": splits_manifest(writer.records, writer.bytes, num_shards), "skipped": skipped,
                    "val_fraction": val_fraction, "test_fraction": test_fraction, **(extra_manifest or {})}
        publish(staging, output_dir, manifest, replace=replace)
        return manifest
    finally:
        remove_staging(staging)


# ---------------------------------------------------------------- reading the manifest

@dataclasses.dataclass(frozen=True)
class Shard:
    path: str
    records: int
    bytes: int


def load_manifest(data_dir: str) -> dict:
    """manifest.json of a data directory, checked for what readers rely on; DataError otherwise."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir!r} does not exist")
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.exists(path):
        leftovers = glob.glob(os.path.join(data_dir, "**", "*.tfrecord"), recursive=True)
        why = (" (it holds shards but no manifest: output of an interrupted or foreign preprocess run)"
               if leftovers else "")
        raise DataError(f"no {MANIFEST} in {data_dir!r}{why}; run `python -m horovod_mlstm.preprocess` to write it")
    try:
        with open(path) as f:
            manifest = json.load(f)
        for split in SPLITS:
            for shard in manifest["splits"][split]["shards"]:
                if not (isinstance(shard["file"], str) and shard["reviews"] >= 0 and shard["bytes"] >= 0):
                    raise ValueError(shard)
                if not _inside(shard["file"]):
                    raise DataError(f"{path} lists a shard outside {data_dir!r}: {shard['file']!r}; the manifest is "
                                    "damaged or foreign, rerun preprocess")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); rerun preprocess") from None
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path} does not list each shard's record and byte counts (written by an older or "
                        "foreign preprocess); rerun `python -m horovod_mlstm.preprocess` on the inputs") from None
    return manifest


def split_shards(data_dir: str, split: str) -> list[Shard]:
    """The shards of one split in manifest order, each checked to exist with the listed size."""
    shards = []
    for entry in load_manifest(data_dir)["splits"][split]["shards"]:
        path = os.path.join(data_dir, entry["file"])
        expected = entry["bytes"] + RECORD_OVERHEAD * entry["reviews"]
        try:
            size = os.path.getsize(path)
        except OSError as e:
            reason = "is missing" if e.errno == errno.ENOENT else f"cannot be read ({e.strerror})"
            raise DataError(f"{path} {reason}, but {MANIFEST} lists it; rerun preprocess") from None
        if size != expected:
            raise DataError(f"{path} has {size:,} bytes where {MANIFEST} says {expected:,} "
                            f"({entry['reviews']:,} records); the data directory is damaged, rerun preprocess")
        shards.append(Shard(path, entry["reviews"], entry["bytes"]))
    return shards
