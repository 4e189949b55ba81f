"""Transfer: the classifier finds a planted unit; CSV problems are one-line errors; the CLI end to end."""

import csv
import json

import numpy as np
import pytest

from conftest import last_line, python
from horovod_mlstm.transfer import TransferError, fit, read_labelled_csv


def test_fit_finds_the_planted_sentiment_unit():
    rng = np.random.default_rng(0)
    features, labels = {}, {}
    for split, n in (("train", 400), ("val", 200), ("test", 200)):
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 64)).astype(np.float32)
        x[:, 17] += 3.0 * (2 * y - 1)  # unit 17 carries the label
        features[split], labels[split] = x, y
    result = fit(features, labels)
    assert result["top_unit"] == 17
    assert result["test_accuracy"] > 0.95 and result["top_unit_test_accuracy"] > 0.95
    assert result["units_used"] < 64  # L1 drops most noise units


def write_csv(path, rows, header=("label", "sentence")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.mark.parametrize("header, rows, message", [
    (("label", "text"), [(1, "good")], "no column 'sentence'"),
    (("label", "sentence"), [], "no rows"),
    (("label", "sentence"), [(0, "a"), (1, "b"), (2, "c")], "two classes, found 3"),
    (("label", "sentence"), [(1, "a"), (1, "b")], "two classes, found 1"),
])
def test_bad_csv(tmp_path, header, rows, message):
    with pytest.raises(TransferError, match=message):
        read_labelled_csv(write_csv(tmp_path / "x.csv", rows, header), "sentence", "label")


def test_every_split_uses_the_training_files_label_mapping(tmp_path):
    _, train_y, classes = read_labelled_csv(write_csv(tmp_path / "t.csv", [("pos", "a"), ("neg", "b")]),
                                            "sentence", "label")
    assert classes == ["neg", "pos"] and train_y.tolist() == [1, 0]
    # A test file holding only positives maps them to 1, as in training (alone it would be class 0).
    _, test_y, _ = read_labelled_csv(write_csv(tmp_path / "p.csv", [("pos", "c"), ("pos", "d")]),
                                     "sentence", "label", classes)
    assert test_y.tolist() == [1, 1]
    with pytest.raises(TransferError, match="label 'positive' is not one of the training file's classes"):
        read_labelled_csv(write_csv(tmp_path / "v.csv", [("positive", "e"), ("neg", "f")]), "sentence", "label",
                          classes)


def test_cli_on_sst_subset(tmp_path, tiny_model_dir, shared_dir):
    paths = {}
    for split, name in (("train", "train"), ("val", "dev"), ("test", "test")):
        with open(shared_dir / "data" / "sst" / f"{name}.csv", newline="") as f:
            rows = list(csv.reader(f))[1:121]
        paths[split] = write_csv(tmp_path / f"{split}.csv", rows)
    out = tmp_path / "out"
    args = ["-m", "horovod_mlstm.transfer", f"--model_dir={tiny_model_dir}", f"--train={paths['train']}",
            f"--val={paths['val']}", f"--test={paths['test']}", f"--output_dir={out}",
            f"--features={tmp_path / 'f.npz'}"]
    proc = python(*args, check=True)
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["test_accuracy"] <= 1.0 and results["sizes"] == {"train": 120, "val": 120, "test": 120}
    assert 0 <= results["top_unit"] < results["units_total"] == 32
    assert (out / "top_unit_histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert "test accuracy" in proc.stdout and "texts/s" in proc.stdout
    saved = np.load(tmp_path / "f.npz")
    assert saved["test_features"].shape == (120, 32)
    # A second run reuses the saved features and reaches the same result.
    python(*args, check=True)
    assert json.loads((out / "results.json").read_text())["test_accuracy"] == results["test_accuracy"]


def test_cli_errors(tmp_path, tiny_model_dir):
    good = write_csv(tmp_path / "g.csv", [(0, "bad"), (1, "good")])
    bad = write_csv(tmp_path / "b.csv", [(0, "x")], header=("y", "text"))
    proc = python("-m", "horovod_mlstm.transfer", f"--model_dir={tiny_model_dir}", f"--train={bad}",
                  f"--val={good}", f"--test={good}")
    assert proc.returncode != 0 and "no column" in last_line(proc.stderr)
    proc = python("-m", "horovod_mlstm.transfer", f"--model_dir={tmp_path}/none", f"--train={good}",
                  f"--val={good}", f"--test={good}")
    assert proc.returncode != 0 and "no trained model" in last_line(proc.stderr)
