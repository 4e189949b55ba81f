"""Labelled text tasks: the train, validation and test splits a classifier is fitted, chosen and scored on.

    csv_task(name, {"train": A, "val": B, "test": C}, text_column, label_column)   any labelled CSVs (transfer)
    load_sst(directory)                                                         SST's train/dev/test.csv
    load_imdb(directory, n_train, n_val, n_test, final_test, seed)              IMDB, seeded stratified subsamples

Every label is read and checked when a task is loaded, before any model is, so a bad row stops the
work before it starts. The texts of a whole file stay in the file (`Column` reads them again when
they are featurised); a subsample keeps its texts in memory, in its order. Each split carries
`source`, what names its texts in the feature cache (features.key).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from horovod_mlstm import files
from horovod_mlstm.textfiles import InputError, csv_rows

SPLITS = ("train", "val", "test")


class TaskError(InputError):
    """A labelled file that cannot be used, explained in one line."""


def label_order(found: set[str]) -> list[str]:
    """Label values in order: numerically when they are all numbers (so "10" comes after "9")."""
    try:
        return sorted(found, key=float)
    except ValueError:
        return sorted(found)


class Column:
    """The texts of one CSV column, read from the file each time they are iterated (none held in memory)."""

    def __init__(self, path: str, column: str, encoding: str, size: int):
        self.path, self.column, self.encoding, self.size = path, column, encoding, size

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return (values[0] for _, values in csv_rows(self.path, [self.column], self.encoding))


def source(path: str, text_column: str, encoding: str, rows: np.ndarray | None = None) -> dict:
    """What names a split's texts: the file's size and SHA-256, the column, the encoding and which rows
    (a hash of their indices in order; "all" for the whole file in file order)."""
    return {"file_bytes": os.path.getsize(path), "file_sha256": files.sha256(path), "text_column": text_column,
            "encoding": encoding,
            "rows": "all" if rows is None else hashlib.sha256(rows.astype(np.int64).tobytes()).hexdigest()}


@dataclasses.dataclass
class Split:
    """The labelled texts of one split (a list, or a file's Column), and what names them."""

    path: str
    texts: object  # a collection of str: iterable, with len()
    labels: np.ndarray
    source: dict
    rows: np.ndarray | None = None  # which rows of the file, in order (None: all, in file order)

    def starts(self, other: "Split") -> bool:
        """This split is the first rows of OTHER (same file), so its features are a slice of OTHER's."""
        return (self.rows is not None and other.rows is not None and self.path == other.path
                and np.array_equal(other.rows[:len(self.rows)], self.rows))


@dataclasses.dataclass
class Task:
    name: str
    classes: list[str]
    splits: dict[str, Split]  # train, val, test, and optionally final_test (the transfer suite's full test set)


def _text_hashes(texts) -> np.ndarray:
    """64-bit hashes of texts, sorted: 8 bytes a text, whatever their length."""
    return np.sort(np.fromiter((int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8)
                                               .digest(), "little") for t in texts), np.uint64))


def overlap_warnings(task: Task) -> list[str]:
    """One line per evaluation split that repeats training texts: its accuracy would then measure what the
    classifier memorised, not how it transfers (a test file given as the training file is the extreme)."""
    train = _text_hashes(task.splits["train"].texts)
    lines = []
    for name, split in task.splits.items():
        if name == "train":
            continue
        shared = int(np.isin(_text_hashes(split.texts), train).sum())
        if shared:
            lines.append(f"warning: {shared:,} of {len(split.texts):,} {name} texts ({split.path}) are also training "
                         f"texts ({task.splits['train'].path}); its accuracy is not a held-out result")
    return lines


def read_labelled(path: str, text_column: str, label_column: str, classes: list[str] | None = None,
                  encoding: str = "utf-8-sig", keep_texts: bool = True):
    """(texts, label indices, classes) of a CSV with a header, read in one pass (texts None unless KEEP_TEXTS).

    Without `classes` (the training file) the file must hold at least two label values, which
    define the classes in order. With the training file's `classes` (validation and test) every
    label must be one of them, so an index means the same in every split; fewer are allowed.
    """
    texts, found = ([] if keep_texts else None), []
    for line, (text, label) in csv_rows(path, [text_column, label_column], encoding):
        label = label.strip()
        if classes is not None and label not in classes:
            raise TaskError(f"{path}:{line}: label {label!r} is not one of the training file's classes {classes}")
        found.append(label)
        if keep_texts:
            texts.append(text)
    if not found:
        raise TaskError(f"{path}: no rows")
    if classes is None:
        classes = label_order(set(found))
        if len(classes) < 2:
            raise TaskError(f"{path}: labels must be at least two classes, found {len(classes)}: {classes}")
    index = {label: i for i, label in enumerate(classes)}
    return texts, np.array([index[label] for label in found], np.int64), classes


def csv_task(name: str, paths: dict[str, str], text_column: str, label_column: str,
             encoding: str = "utf-8-sig") -> Task:
    """A task of labelled CSV files, one per split (train first: its labels define the classes)."""
    splits, classes = {}, None
    for split, path in paths.items():
        _, labels, classes = read_labelled(path, text_column, label_column, classes, encoding, keep_texts=False)
        splits[split] = Split(path, Column(path, text_column, encoding, labels.size), labels,
                              source(path, text_column, encoding))
    return Task(name, classes, splits)


def load_sst(directory: str) -> Task:
    """SST's binary sentiment: train.csv, dev.csv (validation) and test.csv, column `sentence`."""
    return csv_task("sst", {split: os.path.join(directory, name) for split, name in
                            (("train", "train.csv"), ("val", "dev.csv"), ("test", "test.csv"))}, "sentence", "label")


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Every row once, each class shuffled by SEED and interleaved so that any prefix keeps the classes'
    proportions: consecutive slices are disjoint stratified samples, and a longer prefix holds a shorter."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    queues = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    share, taken = counts / counts.sum(), np.zeros(len(classes), np.int64)
    order = np.empty(len(labels), np.int64)
    for k in range(len(labels)):
        behind = int(np.argmax((k + 1) * share - taken))  # the class furthest below its share so far
        order[k] = queues[behind][taken[behind]]
        taken[behind] += 1
    return order


def subsample(path: str, texts: list[str], labels: np.ndarray, rows: np.ndarray, text_column: str,
              encoding: str = "utf-8-sig") -> Split:
    """The given rows of a file, in that order."""
    return Split(path, [texts[i] for i in rows], labels[rows], source(path, text_column, encoding, rows), rows)


def load_imdb(directory: str, n_train: int, n_val: int, n_test: int, final_test: int | None, seed: int) -> Task:
    """Seeded stratified subsamples of the labelled IMDB reviews (final_test None = every test review).

    train.csv.gz in one seeded order: its first n_train reviews for training, the next n_val for
    validation. test.csv.gz in another: its first n_test the test set, its first final_test a second,
    larger one, so a model scored on both reads the shared reviews once.
    """
    train_path, test_path = os.path.join(directory, "train.csv.gz"), os.path.join(directory, "test.csv.gz")
    texts, labels, classes = read_labelled(train_path, "text", "label")
    if n_train + n_val > len(texts):
        raise TaskError(f"{train_path}: {len(texts):,} reviews, fewer than --imdb_train + --imdb_val = "
                        f"{n_train + n_val:,}")
    order = stratified_order(labels, seed)
    splits = {"train": subsample(train_path, texts, labels, order[:n_train], "text"),
              "val": subsample(train_path, texts, labels, order[n_train:n_train + n_val], "text")}
    texts, labels, _ = read_labelled(test_path, "text", "label", classes)
    final_test = final_test or len(texts)
    if final_test < n_test:
        raise TaskError(f"--final_imdb_test {final_test:,} is below --imdb_test {n_test:,}; the final test set "
                        "holds the one every model is scored on")
    if final_test > len(texts):
        raise TaskError(f"{test_path}: {len(texts):,} reviews, fewer than the {final_test:,} asked for")
    order = stratified_order(labels, seed + 1)  # another file, another order
    splits["test"] = subsample(test_path, texts, labels, order[:n_test], "text")
    if final_test != n_test:
        splits["final_test"] = subsample(test_path, texts, labels, order[:final_test], "text")
    return Task("imdb", classes, splits)
