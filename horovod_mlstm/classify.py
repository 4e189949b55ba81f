"""Label new texts with a classifier that transfer saved.

    python -m horovod_mlstm.classify --model_dir M --classifier M/transfer --input reviews.csv \
        --text_column text --output labels.csv

Input: a CSV with a header (--text_column), JSON lines (--text_field), or plain text with one
text per line; any of them may be gzipped. Output: a CSV with one row per input text, in input
order: its index, the predicted label, and the probability of each class. A text that is empty
after the text prep gets an empty label and empty probabilities (there is nothing to classify),
and is counted in the final line. The same in Python:

    classifier = Classifier.load(path)
    probabilities = classifier.predict_proba(Featurizer(model_dir, **classifier.featurization).transform(texts))
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import sys
import time
import zlib

import numpy as np
from absl import app, flags

FORMAT = "horovod_mlstm.classifier"
VERSION = 1
JSON_NAME, WEIGHTS_NAME = "classifier.json", "classifier.npz"


class InputError(ValueError):
    """A file that cannot be used, explained in one line naming it (and the line where it applies)."""


# ---------------------------------------------------------------- reading texts

def read_decoded(path: str, encoding: str) -> str:
    """A whole (optionally gzipped) file as text; a decode error names the file and line."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a file")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        return raw.decode(encoding)
    except LookupError:
        raise InputError(f"unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid {encoding} (byte 0x{raw[e.start]:02x}); "
                         f"pass --encoding, for example latin-1") from None


def read_csv_columns(path: str, columns: list[str], encoding: str) -> list[tuple[int, list[str]]]:
    """(line number, [value of each column]) for every row of a CSV with a header.

    A row with fewer or more fields than the header is an error, not a guess.
    """
    reader = csv.reader(io.StringIO(read_decoded(path, encoding), newline=""))
    try:
        header = next(reader, None)
        missing = [c for c in columns if c not in (header or [])]
        if missing:
            raise InputError(f"{path}:1: no column {', '.join(map(repr, missing))} "
                             f"(columns: {', '.join(header or []) or 'none'})")
        where = [header.index(c) for c in columns]
        rows = []
        for row in reader:
            if not row:  # a blank line is not a record
                continue
            if len(row) != len(header):
                raise InputError(f"{path}:{reader.line_num}: row has {len(row)} fields, the header has "
                                 f"{len(header)}")
            rows.append((reader.line_num, [row[i] for i in where]))
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


def read_texts(path: str, text_column: str = "", text_field: str = "", encoding: str = "utf-8-sig") -> list[str]:
    """Every text of a CSV (text_column), JSON-lines (text_field) or plain one-per-line file."""
    if text_column and text_field:
        raise InputError("give --text_column (CSV) or --text_field (JSON lines), not both")
    name = path[:-3] if path.endswith(".gz") else path
    if text_column:
        texts = [values[0] for _, values in read_csv_columns(path, [text_column], encoding)]
    elif text_field:
        texts = []
        for number, line in enumerate(read_decoded(path, encoding).split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path}:{number}: not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise InputError(f"{path}:{number}: no text field {text_field!r}")
            texts.append(record[text_field])
    elif name.endswith((".csv", ".jsonl", ".json")):
        raise InputError(f"{path}: looks like CSV or JSON lines; name the text with --text_column or --text_field")
    else:
        texts = [line.rstrip("\r") for line in read_decoded(path, encoding).split("\n")]
        if texts[-1] == "":  # after the last newline (or an empty file)
            texts.pop()
    if not texts:
        raise InputError(f"{path}: no texts")
    return texts


# ---------------------------------------------------------------- the classifier

@dataclasses.dataclass
class Classifier:
    """A linear classifier over standardised features, saved as classifier.npz + classifier.json.

    scores = ((features - mean) / scale) @ coef.T + intercept; two classes have one row of
    coefficients (the second label's log-odds), more classes one row each (softmax).
    """

    labels: list[str]
    coef: np.ndarray
    intercept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    info: dict  # C, units, featurization, checkpoint identity, top unit: the JSON's other fields

    @property
    def featurization(self) -> dict:
        return self.info["featurization"]

    def save(self, directory: str) -> str:
        """Writes both files (each replaced whole, never half-written); returns the JSON's path."""
        weights = os.path.join(directory, WEIGHTS_NAME)
        with open(weights + ".tmp", "wb") as f:
            np.savez(f, coef=self.coef, intercept=self.intercept, mean=self.mean, scale=self.scale)
        os.replace(weights + ".tmp", weights)
        return write_json(os.path.join(directory, JSON_NAME),
                          {"format": FORMAT, "version": VERSION, "labels": self.labels, **self.info})

    @classmethod
    def load(cls, path: str) -> "Classifier":
        """From classifier.json or the directory holding it (no pickle: arrays from .npz, the rest JSON)."""
        if os.path.isdir(path):
            path = os.path.join(path, JSON_NAME)
        try:
            with open(path) as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise InputError(f"{path}: no such classifier file") from None
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: not a classifier file ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InputError(f"{path}: not a {FORMAT} file")
        if meta.get("version") != VERSION:
            raise InputError(f"{path}: classifier format version {meta.get('version')}, this horovod_mlstm reads "
                             f"version {VERSION}; refit it with transfer")
        weights = os.path.join(os.path.dirname(path), WEIGHTS_NAME)
        try:
            with np.load(weights, allow_pickle=False) as arrays:
                coef, intercept, mean, scale = (arrays[k] for k in ("coef", "intercept", "mean", "scale"))
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{weights}: unreadable classifier weights ({e})") from None
        labels = meta.pop("labels")
        for key in ("format", "version"):
            meta.pop(key)
        return cls(labels, coef, intercept, mean, scale, meta)

    def check(self, featurizer) -> None:
        """Features from another checkpoint or featurisation would be silently meaningless: refuse them."""
        from horovod_mlstm.inference import describe_checkpoint, same_checkpoint

        fitted, given = {**self.info["checkpoint"], "model_dir": self.info["model_dir"]}, featurizer.identity()
        if not same_checkpoint(fitted, given):
            raise InputError(f"the classifier was fitted on features of {describe_checkpoint(fitted)}, "
                             f"not of {describe_checkpoint(given)}")
        if featurizer.settings != self.featurization:
            raise InputError(f"the classifier was fitted on features made with {self.featurization}, "
                             f"not {featurizer.settings}")

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """[n, classes] probabilities, columns in the order of `labels`."""
        from scipy.special import expit, softmax

        if features.ndim != 2 or features.shape[1] != self.mean.size:
            raise InputError(f"features of shape {features.shape}: the classifier needs {self.mean.size} units")
        scores = ((features - self.mean) / self.scale) @ self.coef.T + self.intercept
        if len(self.labels) == 2:
            p = expit(scores[:, 0])
            return np.stack([1 - p, p], axis=1)
        return softmax(scores, axis=1)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.array(self.labels)[np.argmax(self.predict_proba(features), axis=1)]


def write_json(path: str, value) -> str:
    """Replaces PATH whole with VALUE as JSON, so a crash never leaves half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def check_writable(path: str) -> None:
    """Before any work: the output's directory exists and can be written, and PATH is not a directory."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory")
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise InputError(f"{path}: cannot write there ({directory} is not a writable directory)")


# ---------------------------------------------------------------- CLI

def settings_from(classifier: Classifier, FLAGS) -> dict:
    """The classifier's featurisation; an explicit flag that contradicts it is an error."""
    settings = dict(classifier.featurization)
    for name, fitted in settings.items():
        given = FLAGS[name].value
        if given is not None and given != fitted:
            raise InputError(f"--{name}={given} conflicts with the classifier, which was fitted with "
                             f"{name}={fitted} (leave --{name} out to use it)")
    return settings


def write_predictions(path: str, labels: list[str], probabilities: list) -> None:
    """index, label, p_<label>...: one row per input; None (an empty text) leaves the row's values empty."""
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label", *(f"p_{label}" for label in labels)])
        for index, p in enumerate(probabilities):
            if p is None:
                writer.writerow([index, "", *[""] * len(labels)])
            else:
                writer.writerow([index, labels[int(np.argmax(p))], *(f"{v:.6f}" for v in p)])
    os.replace(path + ".tmp", path)


def main(argv):
    from tqdm import tqdm

    from horovod_mlstm import distributed as dist
    from horovod_mlstm.checkpoint import CheckpointError
    from horovod_mlstm.inference import Featurizer, is_empty

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    dist.init(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    try:
        check_writable(FLAGS.output)
        classifier = Classifier.load(FLAGS.classifier)
        settings = settings_from(classifier, FLAGS)
        texts = read_texts(FLAGS.input, FLAGS.text_column, FLAGS.text_field, FLAGS.encoding)
        featurizer = Featurizer(FLAGS.model_dir, **settings, batch_size=FLAGS.batch_size_per_worker,
                                chunk=FLAGS.seq_length)
        classifier.check(featurizer)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    keep = [i for i, t in enumerate(texts) if not is_empty(t, settings["text_prep"])]
    start = time.time()
    with tqdm(total=len(keep), unit="text", desc="classifying", file=sys.stderr) as bar:
        features = featurizer.transform([texts[i] for i in keep], progress=bar.update)
    probabilities = [None] * len(texts)
    for i, p in zip(keep, classifier.predict_proba(features)):
        probabilities[i] = p
    write_predictions(FLAGS.output, classifier.labels, probabilities)
    seconds = time.time() - start
    print(f"[classify] {len(texts)} texts ({len(texts) - len(keep)} empty, left unlabelled) in {seconds:.1f} s, "
          f"{len(keep) / max(seconds, 1e-9):,.0f} texts/s; labels in {FLAGS.output}", flush=True)


if __name__ == "__main__":
    from horovod_mlstm.flags import define_common
    from horovod_mlstm.inference import define_featurizer_flags

    define_common()
    define_featurizer_flags(defaults=False)
    flags.DEFINE_string("classifier", None, "classifier.json written by transfer, or the directory holding it.")
    flags.DEFINE_string("input", None, "Texts: CSV (--text_column), JSON lines (--text_field) or one per line; "
                        "plain or .gz.")
    flags.DEFINE_string("output", None, "CSV to write: index, label, p_<label> per class.")
    flags.DEFINE_string("text_column", "", "CSV column holding the text.")
    flags.DEFINE_string("text_field", "", "JSON-lines field holding the text.")
    flags.DEFINE_string("encoding", "utf-8-sig", "Input encoding (utf-8-sig also reads UTF-8 with or without a "
                        "BOM), for example latin-1.")
    flags.mark_flags_as_required(["classifier", "input", "output"])
    app.run(main)
