"""The project's file primitives: write a file whole or not at all, check an output before the work,
name a file by its hash.

Every file the project writes (config.json, summary.json, classifier.json, caches, results,
predictions, RNN state rows) goes through `replace_whole`: the bytes go to a temporary file beside
the destination, are flushed to disk and renamed over it, so a reader sees the old file or the new
one, never half of one, whatever stops the writer (kill -9, a full disk, a second Ctrl-C). Two
writers of one path never share a temporary file, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: mkstemp makes 0600 files, the project's outputs get the user's usual mode


class NotWritable(ValueError):
    """An output that cannot be written, found before any work: one line naming it."""


@contextlib.contextmanager
def replace_whole(path: str, mode: str = "w", **open_kwargs):
    """Yields a file object; on a clean exit its contents replace PATH in one rename, else PATH is untouched."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def strict(value):
    """VALUE with every NaN and infinity as None, so that it is strict JSON (null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_json(path: str, value) -> str:
    """Replaces PATH whole with VALUE as strict JSON (non-finite numbers as null); returns PATH."""
    with replace_whole(path) as f:
        json.dump(strict(value), f, indent=2, allow_nan=False)
    return path


def write_bytes(path: str, data: bytes) -> str:
    with replace_whole(path, "wb") as f:
        f.write(data)
    return path


def check_writable(path: str, what: str = "") -> None:
    """Before any work: PATH is not a directory and can be created or replaced where it is.

    WHAT names the flag in the message (e.g. "--output"); NotWritable otherwise names PATH alone.
    """
    name = f"{what} {path}" if what else path
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise NotWritable(f"{name}: is a directory")
    if not os.path.isdir(directory):
        raise NotWritable(f"{name}: cannot write there (directory {directory} does not exist)")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise NotWritable(f"{name}: cannot write there ({directory} is not writable)")


def make_dir(path: str, what: str) -> None:
    """Before any work: directory PATH exists (made with its parents if needed) and can be written in;
    otherwise NotWritable, naming WHAT (e.g. "--model_dir")."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise NotWritable(f"cannot create {what} {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise NotWritable(f"{what} {path} is not writable")


def sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, hex: what names checkpoints, inputs and caches."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
