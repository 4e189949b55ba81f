"""The feature cache: features of texts saved with a key of everything they depend on, and reused only
when a later run's key is the same.

Featurising is the slow part of transfer (minutes to hours for long reviews); refitting a classifier
on saved features takes seconds. The key of an entry:

    format       this module's FORMAT (an entry of another format is recomputed)
    checkpoint   the weights: modeldir.IDENTITY_KEYS of the checkpoint read (name, hashes of its
                 .index and of config.json), so a moved model dir still matches and retrained weights never do
    text_prep    how the texts were prepared for the model (inference.TEXT_PREPS)
    readouts     which readouts the entry holds
    inputs       {name: source} for each input read: its file's size and SHA-256, the column or field
                 holding the text, the encoding and which of its rows (tasks.Split.source)

An entry is one .npz (the key as JSON, then an array per input and readout), replaced whole
(files.replace_whole). transfer --features F.npz is one entry holding its three splits; the
transfer suite keeps one per model and split. A key that differs is recomputed, with one line
naming what differs; a file that is not an entry is refused rather than overwritten.

The suite's other slow results (classifier fits, validation BPC) are cached by `cached_json` under
the same rule.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

import numpy as np

from horovod_mlstm import files
from horovod_mlstm.modeldir import IDENTITY_KEYS
from horovod_mlstm.textfiles import InputError

FORMAT = 3  # 2 was transfer's own --features file, 1 the transfer suite's

Features = dict[str, dict[str, np.ndarray]]  # {input: {readout: [texts, hidden]}}


def key(identity: dict, text_prep: str, readouts, inputs: dict[str, dict]) -> dict:
    """The key of features of INPUTS ({name: source}) read by the checkpoint IDENTITY names."""
    return {"format": FORMAT, "checkpoint": {k: identity[k] for k in IDENTITY_KEYS}, "text_prep": text_prep,
            "readouts": sorted(readouts), "inputs": inputs}


def differences(stored: dict, wanted: dict) -> list[str]:
    """What differs between two keys, in words: 'checkpoint', 'test input', ..."""
    found = []
    for part, value in wanted.items():
        if part == "inputs" and isinstance(stored.get(part), dict):
            found += [f"{name} input" for name in value if stored[part].get(name) != value[name]]
            found += [f"{name} input" for name in stored[part] if name not in value]
        elif stored.get(part) != value:
            found.append(part)
    return found


def _say_recomputing(path: str, what: str, differ: list[str]) -> None:
    print(f"[features] {path} holds {what} of other inputs ({', '.join(differ)} differ); recomputing",
          file=sys.stderr, flush=True)


def _not_ours(path: str, why) -> InputError:
    return InputError(f"{path}: not a cache file of this project ({why}); move it or name another file")


def load(path: str, wanted: dict) -> Features | None:
    """The features saved in PATH if they were made from exactly the key WANTED, else None (saying why)."""
    if not os.path.exists(path):
        return None
    try:
        saved = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
        raise _not_ours(path, e) from None
    if not isinstance(saved, np.lib.npyio.NpzFile):
        raise _not_ours(path, "an array, not an .npz archive")
    with saved:
        try:
            stored = json.loads(str(saved["key"]))
            differ = differences(stored, wanted) if isinstance(stored, dict) else ["format"]
            if differ:
                _say_recomputing(path, "features", differ)
                return None
            features = {name: {} for name in wanted["inputs"]}
            for member in saved.files:
                if member != "key":
                    name, readout = member.rsplit("/", 1)
                    features[name][readout] = saved[member]
        except (OSError, ValueError, KeyError, RecursionError) as e:  # no key, or damaged
            raise _not_ours(path, e) from None
    return features


def save(path: str, key_: dict, features: Features) -> None:
    with files.replace_whole(path, "wb") as f:
        np.savez(f, key=json.dumps(key_, sort_keys=True),
                 **{f"{name}/{readout}": values for name, by_readout in features.items()
                    for readout, values in by_readout.items()})


def cached(path: str, key_: dict, compute: Callable[[], Features]) -> tuple[Features, bool]:
    """(features, True) from PATH when its key is KEY_, else (compute(), False) saved to PATH."""
    features = load(path, key_)
    if features is not None:
        return features, True
    features = compute()
    save(path, key_, features)
    return features, False


def cached_json(path: str, key_: dict, compute: Callable[[], object]) -> tuple[object, bool]:
    """The same for a JSON value: (value, True) from PATH when its key is KEY_, else (compute(), False) saved."""
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
            stored = saved["key"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise _not_ours(path, e) from None
        differ = differences(stored, key_) if isinstance(stored, dict) else ["format"]
        if not differ:
            return saved["value"], True
        _say_recomputing(path, "results", differ)
    value = compute()
    files.write_json(path, {"key": key_, "value": value})
    return value, False
