"""Transfer: planted units are found (two or more classes), CSV problems are one-line errors naming the line,
the features cache follows its inputs, the saved classifier reproduces the fit, and the CLI end to end."""

import csv
import json

import numpy as np
import pytest

from conftest import last_line, python
from horovod_mlstm import corpus
from horovod_mlstm.classifier import Classifier
from horovod_mlstm.textfiles import InputError
from horovod_mlstm.transfer import SPLITS, fit, read_labelled_csv


def planted(classes: int, unit: int = 17, seed: int = 0):
    """Noise features where UNIT carries the class (one Gaussian bump per class)."""
    rng = np.random.default_rng(seed)
    features, labels = {}, {}
    for split, n in (("train", 400), ("val", 200), ("test", 200)):
        y = rng.integers(0, classes, n)
        x = rng.normal(size=(n, 64)).astype(np.float32)
        x[:, unit] += 6.0 * y
        features[split], labels[split] = x, y
    return features, labels


@pytest.mark.unit
def test_fit_finds_the_planted_sentiment_unit():
    features, labels = planted(2)
    result, pipeline = fit(features, labels, ["neg", "pos"])
    assert result["top_unit"] == 17 and result["top_unit_weight"] > 0
    assert result["test_accuracy"] > 0.95 and result["top_unit_test_accuracy"] > 0.95
    assert result["test_macro_f1"] > 0.95 and result["units_used"] < 64  # L1 drops most noise units
    assert sum(map(sum, result["test_confusion_matrix"])) == 200


@pytest.mark.unit
def test_fit_multiclass_and_the_saved_classifier_reproduces_it(tmp_path):
    features, labels = planted(4)
    result, pipeline = fit(features, labels, ["1", "2", "4", "5"])
    assert result["test_accuracy"] > 0.9 and result["test_macro_f1"] > 0.9 and "top_unit" not in result
    assert np.array(result["test_confusion_matrix"]).shape == (4, 4)
    scaler, model = pipeline
    Classifier(["1", "2", "4", "5"], model.coef_, model.intercept_, scaler.mean_, scaler.scale_,
               {"featurization": {}, "checkpoint": {}}).save(str(tmp_path))
    loaded = Classifier.load(str(tmp_path))  # the directory or the .json both work
    np.testing.assert_allclose(loaded.predict_proba(features["test"]), pipeline.predict_proba(features["test"]),
                               rtol=1e-5, atol=1e-6)
    expected = np.array(["1", "2", "4", "5"])[pipeline.predict(features["test"])]
    assert (loaded.predict(features["test"]) == expected).all()


@pytest.mark.unit
def test_when_l1_keeps_no_unit_there_is_no_top_unit():
    features, labels = planted(2)
    for split in features:  # constant features: standardised to zero, every weight stays zero
        features[split] = np.ones_like(features[split])
    result, _ = fit(features, labels, ["0", "1"])
    assert result["units_used"] == 0
    assert result["top_unit"] is None and result["top_unit_weight"] is None and result["top_unit_test_accuracy"] is None


def write_csv(path, rows, header=("label", "text"), encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.mark.unit
@pytest.mark.parametrize("header, rows, message", [
    (("label", "sentence"), [(1, "good")], "x.csv:1: no column 'text'"),
    (("label", "text"), [], "no rows"),
    (("label", "text"), [(1, "a"), (1, "b")], "at least two classes, found 1"),
    (("label", "text"), [(1, "a"), ("b",), (0, "c")], r"x.csv:3: row has 1 fields, the header has 2"),
    (("label", "text"), [(1, "a"), (0, "b", "extra")], r"x.csv:3: row has 3 fields, the header has 2"),
])
def test_bad_csv(tmp_path, header, rows, message):
    with pytest.raises(InputError, match=message):
        read_labelled_csv(write_csv(tmp_path / "x.csv", rows, header), "text", "label")


@pytest.mark.unit
def test_real_world_encodings(tmp_path):
    rows = [(1, "très bien"), (0, "mauvais")]
    bom = tmp_path / "bom.csv"  # spreadsheet exports start with a UTF-8 BOM
    bom.write_bytes(b"\xef\xbb\xbf" + open(write_csv(tmp_path / "plain.csv", rows), "rb").read())
    texts, _, _ = read_labelled_csv(str(bom), "text", "label")
    assert texts == ["très bien", "mauvais"]
    latin = write_csv(tmp_path / "latin.csv", rows, encoding="latin-1")
    with pytest.raises(InputError, match=r"latin.csv:2: not valid utf-8-sig .*--encoding"):
        read_labelled_csv(latin, "text", "label")
    assert read_labelled_csv(latin, "text", "label", encoding="latin-1")[0] == ["très bien", "mauvais"]


@pytest.mark.unit
def test_labels_keep_the_training_files_classes_in_numeric_order(tmp_path):
    _, train_y, classes = read_labelled_csv(write_csv(tmp_path / "t.csv", [(10, "a"), (2, "b"), (9, "c")]),
                                            "text", "label")
    assert classes == ["2", "9", "10"] and train_y.tolist() == [2, 0, 1]
    # A test file holding only some classes maps them as in training.
    _, test_y, _ = read_labelled_csv(write_csv(tmp_path / "p.csv", [(10, "c"), (10, "d")]), "text", "label",
                                     classes)
    assert test_y.tolist() == [2, 2]
    with pytest.raises(InputError, match=r"v.csv:3: label '7' is not one of the training file's classes"):
        read_labelled_csv(write_csv(tmp_path / "v.csv", [(2, "e"), (7, "f")]), "text", "label", classes)


def review_csvs(tmp_path, n: int, label) -> dict:
    """train/val/test CSVs (label, text) of held-out synthetic reviews (the tiny model read others like them)."""
    paths = {}
    for seed, split in enumerate(SPLITS):
        rows = [(label(r), r["reviewText"]) for r in corpus.reviews(n, seed=100 + seed)]
        paths[split] = write_csv(tmp_path / f"{split}.csv", rows, header=("label", "text"))
    return paths


def transfer(model_dir, paths, out, *extra, **kw):
    return python("-m", "horovod_mlstm.transfer", f"--model_dir={model_dir}", f"--train={paths['train']}",
                  "--text_column=text",
                  f"--val={paths['val']}", f"--test={paths['test']}", f"--output_dir={out}", *extra, **kw)


@pytest.mark.cli
def test_cli_binary_and_the_features_cache(tmp_path, tiny_model_dir):
    paths = review_csvs(tmp_path, 60, lambda r: "pos" if r["overall"] >= 4 else "neg")
    out, cache = tmp_path / "out", tmp_path / "f.npz"
    proc = transfer(tiny_model_dir, paths, out, f"--features={cache}", check=True)
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["test_accuracy"] <= 1.0 and results["sizes"] == {"train": 60, "val": 60, "test": 60}
    assert 0 <= results["top_unit"] < results["units_total"] == 32 and results["labels"] == ["neg", "pos"]
    assert results["empty_texts"] == {"train": 0, "val": 0, "test": 0} and results["checkpoint"] == "ckpt-20"
    assert (out / "top_unit_histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert "test accuracy" in proc.stdout and "texts/s" in proc.stdout
    saved = json.loads((out / "classifier.json").read_text())
    assert saved["labels"] == ["neg", "pos"]
    assert saved["featurization"] == {"text_prep": "project", "readout": "final_cell"}
    assert saved["top_unit"] == results["top_unit"] and saved["top_unit_weight"] == results["top_unit_weight"]
    assert saved["checkpoint"]["checkpoint"] == "ckpt-20" and len(saved["checkpoint"]["index_sha256"]) == 64
    assert np.load(cache)["test_features"].shape == (60, 32)

    # Same inputs: the cache is reused and gives the same result.
    proc = transfer(tiny_model_dir, paths, out, f"--features={cache}", check=True)
    assert "features from" in proc.stdout and "recomputing" not in proc.stderr
    assert json.loads((out / "results.json").read_text())["test_accuracy"] == results["test_accuracy"]
    # Another test file, or another text prep: recomputed, with a line saying why.
    paths["test"] = write_csv(tmp_path / "test2.csv", [("neg", "awful film"), ("pos", "a delight")] * 5)
    proc = transfer(tiny_model_dir, paths, out, f"--features={cache}", "--text_prep=radford", check=True)
    assert "recomputing" in proc.stderr and "files" in proc.stderr and "text_prep" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["sizes"]["test"] == 10 and results["featurization"]["text_prep"] == "radford"
    assert np.load(cache)["test_features"].shape == (10, 32)


@pytest.mark.cli
def test_cli_multiclass_stars(tmp_path, tiny_model_dir):
    paths, out = review_csvs(tmp_path, 60, lambda r: int(r["overall"])), tmp_path / "out"
    proc = transfer(tiny_model_dir, paths, out,
                    "--readout=mean_hidden", check=True)
    results = json.loads((out / "results.json").read_text())
    assert results["labels"] == ["1", "2", "4", "5"] and "top_unit" not in results
    assert 0.0 <= results["test_macro_f1"] <= 1.0 and np.array(results["test_confusion_matrix"]).sum() == 60
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "top_unit_histogram.png").exists() and "4 classes" in proc.stdout
    saved = Classifier.load(str(out / "classifier.json"))
    assert saved.coef.shape == (4, 32) and saved.featurization["readout"] == "mean_hidden"


@pytest.mark.cli
def test_cli_all_empty_texts_select_no_unit(tmp_path, tiny_model_dir):
    rows = [(0, " "), (1, "<br/>"), (0, ""), (1, "  ")]
    paths = {s: write_csv(tmp_path / f"{s}.csv", rows) for s in SPLITS}
    out = tmp_path / "out"
    out.mkdir()
    (out / "top_unit_histogram.png").write_bytes(b"an earlier run's plot")
    proc = transfer(tiny_model_dir, paths, out, check=True)
    results = json.loads((out / "results.json").read_text())
    assert results["top_unit"] is None and results["units_used"] == 0
    assert results["empty_texts"] == {"train": 4, "val": 4, "test": 4}
    assert "selected no unit" in proc.stdout and "12 empty texts" in proc.stdout
    assert not (out / "top_unit_histogram.png").exists()
    assert json.loads((out / "classifier.json").read_text())["top_unit"] is None



@pytest.mark.cli
def test_cli_errors(tmp_path, tiny_model_dir):
    good = write_csv(tmp_path / "g.csv", [(0, "bad"), (1, "good")])
    short = write_csv(tmp_path / "s.csv", [(0, "bad"), (1,), (1, "good")])
    proc = transfer(tiny_model_dir, {"train": good, "val": short, "test": good}, tmp_path / "o")
    assert proc.returncode != 0 and last_line(proc.stderr) == f"error: {short}:3: row has 1 fields, the header has 2"
    proc = transfer(tmp_path / "none", {"train": good, "val": good, "test": good}, tmp_path / "o")
    assert proc.returncode != 0 and "no trained model" in last_line(proc.stderr)
    junk = tmp_path / "junk.npz"
    junk.write_text("not a features file")
    proc = transfer(tiny_model_dir, {"train": good, "val": good, "test": good}, tmp_path / "o", f"--features={junk}")
    assert proc.returncode != 0 and "junk.npz: not a features file" in last_line(proc.stderr)
    assert junk.read_text() == "not a features file"  # a file that is not ours is left alone
