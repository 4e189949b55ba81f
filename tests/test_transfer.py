"""Transfer: planted units are found (two or more classes), the readout and C are chosen on validation and never
on test, CSV problems are one-line errors naming the line, the feature cache follows its inputs, the saved
classifier reproduces the fit, and the CLI end to end."""

import csv
import json
import random

import numpy as np
import pytest

from conftest import last_line, python
from horovod_mlstm import corpus, features as feature_cache
from horovod_mlstm.classifier import Classifier
from horovod_mlstm.inference import READOUTS, Featurizer
from horovod_mlstm.tasks import SPLITS, read_labelled
from horovod_mlstm.textfiles import InputError
from horovod_mlstm.transfer import fit, fit_readouts, stored_readouts, tfidf_baseline, with_readouts

PLAIN = [r for r in READOUTS if r != "concat_hidden"]  # what a --features file holds for --readout auto


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.json", "classifier.npz"]  # no temporary left
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


@pytest.mark.unit
def test_readout_and_c_are_chosen_on_val_never_on_test():
    rng = np.random.default_rng(0)
    labels = {s: rng.integers(0, 2, n) for s, n in (("train", 60), ("val", 40), ("test", 40))}
    # Each readout carries the label with a different amount of noise, so they score differently.
    features = {s: {r: y[:, None] * (k + 1) * 0.3 + rng.normal(size=(len(y), 6)) for k, r in enumerate(READOUTS)}
                for s, y in labels.items()}
    flipped = {**labels, "test": 1 - labels["test"]}  # anything chosen on test would change
    (fits, chosen), (fits_flipped, chosen_flipped) = (fit_readouts(features, y, ["0", "1"]) for y in (labels, flipped))
    assert list(fits) == list(READOUTS) and chosen == chosen_flipped
    assert fits[chosen][0]["val_accuracy"] == max(f[0]["val_accuracy"] for f in fits.values())
    for readout in READOUTS:
        a, b = fits[readout][0], fits_flipped[readout][0]
        assert (a["C"], a["val_accuracy"]) == (b["C"], b["val_accuracy"])
        assert b["test_accuracy"] == pytest.approx(1 - a["test_accuracy"])
    # One readout alone (an explicit --readout) is the only choice.
    fits, chosen = fit_readouts({s: {"mean_hidden": f["mean_hidden"]} for s, f in features.items()}, labels, ["0", "1"])
    assert list(fits) == ["mean_hidden"] and chosen == "mean_hidden"


@pytest.mark.unit
def test_concat_hidden_is_joined_from_its_parts_which_are_what_is_featurised():
    assert stored_readouts(list(READOUTS)) == PLAIN == ["final_cell", "final_hidden", "mean_hidden", "max_hidden"]
    assert stored_readouts(["concat_hidden"]) == ["final_hidden", "mean_hidden", "max_hidden"]
    assert stored_readouts(["max_hidden", "concat_hidden", "final_cell"]) == PLAIN
    assert stored_readouts(["mean_hidden"]) == ["mean_hidden"]
    parts = {r: np.full((2, 3), i, np.float32) for i, r in enumerate(PLAIN)}
    joined = with_readouts(parts, ["concat_hidden"])
    assert list(joined) == ["concat_hidden"]  # the parts not asked for are not fitted
    np.testing.assert_array_equal(joined["concat_hidden"], [[1] * 3 + [2] * 3 + [3] * 3] * 2)
    every = with_readouts(parts, list(READOUTS))
    assert list(every) == list(READOUTS) and every["final_cell"] is parts["final_cell"]


@pytest.mark.unit
def test_tfidf_baseline_chooses_c_on_val():
    rng = random.Random(1)
    words = {0: ["awful", "boring", "broken", "dull"], 1: ["great", "lovely", "superb", "fun"]}
    rows = [(i % 2, " ".join([rng.choice(words[i % 2])] + rng.choices(["the", "film", "was", "a"], k=5)))
            for i in range(60)]
    texts = {"train": rows[:30], "val": rows[30:45], "test": rows[45:]}
    labels = {s: np.array([y for y, _ in v]) for s, v in texts.items()}
    texts = {s: [t for _, t in v] for s, v in texts.items()}
    a = tfidf_baseline(texts, labels, "project")
    b = tfidf_baseline(texts, {**labels, "test": 1 - labels["test"]}, "project")
    assert (a["C"], a["val_accuracy"]) == (b["C"], b["val_accuracy"]) and a["features"] > 0
    assert b["test_accuracy"] == pytest.approx(1 - a["test_accuracy"]) and a["test_accuracy"] > 0.8


def source(sha="a" * 64, rows="all"):
    return {"file_bytes": 10, "file_sha256": sha, "text_column": "text", "encoding": "utf-8-sig", "rows": rows}


IDENTITY = {"model_dir": "/m", "checkpoint": "ckpt-20", "index_sha256": "1" * 64, "config_sha256": "2" * 64}


@pytest.mark.unit
def test_the_feature_cache_is_reused_only_for_its_key(tmp_path, capsys):
    path = str(tmp_path / "f.npz")
    key = feature_cache.key(IDENTITY, "project", READOUTS, {s: source() for s in SPLITS})
    made = {s: {r: np.full((3, 4), i, np.float32) for i, r in enumerate(READOUTS)} for s in SPLITS}
    calls = []

    def compute():
        calls.append(1)
        return made

    assert feature_cache.cached(path, key, compute)[1] is False
    features, from_cache = feature_cache.cached(path, key, compute)
    assert from_cache and len(calls) == 1 and capsys.readouterr().err == ""
    np.testing.assert_array_equal(features["test"]["max_hidden"], made["test"]["max_hidden"])
    # The same weights moved elsewhere are the same weights.
    assert feature_cache.load(path, feature_cache.key({**IDENTITY, "model_dir": "/moved"}, "project", READOUTS,
                                                      {s: source() for s in SPLITS})) is not None
    for changed, why in [({**IDENTITY, "checkpoint": "ckpt-21"}, "checkpoint"), (IDENTITY, "test input"),
                         (IDENTITY, "text_prep")]:
        inputs = {s: source("b" * 64 if why == "test input" and s == "test" else "a" * 64) for s in SPLITS}
        other = feature_cache.key(changed, "radford" if why == "text_prep" else "project", READOUTS, inputs)
        assert feature_cache.load(path, other) is None
        said = capsys.readouterr().err
        assert said == f"[features] {path} holds features of other inputs ({why} differ); recomputing\n"
    fewer = feature_cache.key(IDENTITY, "project", ["final_cell"], {s: source(rows="0f" * 32) for s in SPLITS})
    assert feature_cache.load(path, fewer) is None
    assert "(readouts, train input, val input, test input differ)" in capsys.readouterr().err

    # transfer's own cache of the version before: recognised as a cache, recomputed and overwritten
    np.savez(path, key=json.dumps({"format": 2, "files": {}}), train_features=np.zeros((3, 4)))
    assert feature_cache.cached(path, key, compute)[1] is False and "format" in capsys.readouterr().err
    assert feature_cache.load(path, key) is not None
    # a file that is not a cache is refused, and left as it was
    for junk in (b"not a features file", b""):
        (tmp_path / "junk.npz").write_bytes(junk)
        with pytest.raises(InputError, match=r"junk.npz: not a cache file of this project"):
            feature_cache.cached(str(tmp_path / "junk.npz"), key, compute)
        assert (tmp_path / "junk.npz").read_bytes() == junk
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(InputError, match="not an .npz archive"):
        feature_cache.load(str(tmp_path / "array.npy"), key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["array.npy", "f.npz", "junk.npz"]  # no temporaries


@pytest.mark.unit
def test_json_results_are_cached_under_the_same_rule(tmp_path, capsys):
    path = str(tmp_path / "fits.json")
    key = {**feature_cache.key(IDENTITY, "project", READOUTS, {"train": source()}), "seed": 0}
    value, from_cache = feature_cache.cached_json(path, key, lambda: [{"C": 0.5, "val_accuracy": float("nan")}])
    assert value[0]["C"] == 0.5 and not from_cache
    assert feature_cache.cached_json(path, key, lambda: 1 / 0) == ([{"C": 0.5, "val_accuracy": None}], True)
    assert feature_cache.cached_json(path, {**key, "seed": 1}, lambda: "refit") == ("refit", False)
    assert "(seed differ); recomputing" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[" * 100_000)
    with pytest.raises(InputError, match="bad.json: not a cache file of this project"):
        feature_cache.cached_json(str(tmp_path / "bad.json"), key, lambda: 0)


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
        read_labelled(write_csv(tmp_path / "x.csv", rows, header), "text", "label")


@pytest.mark.unit
def test_real_world_encodings(tmp_path):
    rows = [(1, "très bien"), (0, "mauvais")]
    bom = tmp_path / "bom.csv"  # spreadsheet exports start with a UTF-8 BOM
    bom.write_bytes(b"\xef\xbb\xbf" + open(write_csv(tmp_path / "plain.csv", rows), "rb").read())
    texts, _, _ = read_labelled(str(bom), "text", "label")
    assert texts == ["très bien", "mauvais"]
    latin = write_csv(tmp_path / "latin.csv", rows, encoding="latin-1")
    with pytest.raises(InputError, match=r"latin.csv:2: not valid utf-8-sig .*--encoding"):
        read_labelled(latin, "text", "label")
    assert read_labelled(latin, "text", "label", encoding="latin-1")[0] == ["très bien", "mauvais"]


@pytest.mark.unit
def test_labels_keep_the_training_files_classes_in_numeric_order(tmp_path):
    _, train_y, classes = read_labelled(write_csv(tmp_path / "t.csv", [(10, "a"), (2, "b"), (9, "c")]),
                                            "text", "label")
    assert classes == ["2", "9", "10"] and train_y.tolist() == [2, 0, 1]
    # A test file holding only some classes maps them as in training.
    _, test_y, _ = read_labelled(write_csv(tmp_path / "p.csv", [(10, "c"), (10, "d")]), "text", "label",
                                     classes)
    assert test_y.tolist() == [2, 2]
    with pytest.raises(InputError, match=r"v.csv:3: label '7' is not one of the training file's classes"):
        read_labelled(write_csv(tmp_path / "v.csv", [(2, "e"), (7, "f")]), "text", "label", classes)


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
    width = 96 if results["featurization"]["readout"] == "concat_hidden" else 32  # 3 x 32 units side by side
    assert 0 <= results["top_unit"] < results["units_total"] == width and results["labels"] == ["neg", "pos"]
    assert results["empty_texts"] == {"train": 0, "val": 0, "test": 0} and results["checkpoint"] == "ckpt-20"
    assert (out / "top_unit_histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert "test accuracy" in proc.stdout and "texts/s" in proc.stdout
    # --readout auto: every readout fitted, the one best on validation kept, in results and classifier alike
    chosen = results["featurization"]["readout"]
    assert results["readout_asked"] == "auto" and set(results["readouts"]) == set(READOUTS)
    assert results["readouts"][chosen]["val_accuracy"] == results["val_accuracy"] == max(
        r["val_accuracy"] for r in results["readouts"].values())
    assert f"[transfer] readout {chosen}, the best validation accuracy of final_cell" in proc.stdout
    saved = json.loads((out / "classifier.json").read_text())
    assert saved["labels"] == ["neg", "pos"] and saved["version"] == 2 and len(saved["weights_sha256"]) == 64
    assert saved["featurization"] == {"text_prep": "project", "readout": chosen} and saved["readout_asked"] == "auto"
    assert saved["top_unit"] == results["top_unit"] and saved["top_unit_weight"] == results["top_unit_weight"]
    assert saved["checkpoint"]["checkpoint"] == "ckpt-20" and len(saved["checkpoint"]["index_sha256"]) == 64
    # The cache holds the plain readouts (concat_hidden is joined from them): the same entry as before it existed.
    assert set(np.load(cache).files) == {"key"} | {f"{s}/{r}" for s in SPLITS for r in PLAIN}
    assert json.loads(str(np.load(cache)["key"]))["readouts"] == sorted(PLAIN)
    assert np.load(cache)["test/final_cell"].shape == (60, 32)

    # Same inputs: the cache is reused and gives the same result.
    proc = transfer(tiny_model_dir, paths, out, f"--features={cache}", check=True)
    assert "features from" in proc.stdout and "recomputing" not in proc.stderr
    assert json.loads((out / "results.json").read_text())["test_accuracy"] == results["test_accuracy"]
    # Another test file, or another text prep: recomputed, with a line saying why.
    paths["test"] = write_csv(tmp_path / "test2.csv", [("neg", "awful film"), ("pos", "a delight")] * 5)
    proc = transfer(tiny_model_dir, paths, out, f"--features={cache}", "--text_prep=radford", check=True)
    assert f"[features] {cache} holds features of other inputs (text_prep, test input differ); recomputing" \
        in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["sizes"]["test"] == 10 and results["featurization"]["text_prep"] == "radford"
    assert np.load(cache)["test/mean_hidden"].shape == (10, 32)


@pytest.mark.cli
def test_cli_concat_hidden_classifier_applies_as_fitted(tmp_path, tiny_model_dir):
    paths = review_csvs(tmp_path, 60, lambda r: "pos" if r["overall"] >= 4 else "neg")
    out, cache = tmp_path / "out", tmp_path / "f.npz"
    transfer(tiny_model_dir, paths, out, "--readout=concat_hidden", f"--features={cache}", check=True)
    results = json.loads((out / "results.json").read_text())
    assert results["readout_asked"] == "concat_hidden" and list(results["readouts"]) == ["concat_hidden"]
    assert results["featurization"]["readout"] == "concat_hidden" and results["units_total"] == 96  # 3 x 32 units
    assert set(np.load(cache).files) == {"key"} | {f"{s}/{r}" for s in SPLITS
                                                   for r in ("final_hidden", "mean_hidden", "max_hidden")}
    saved = Classifier.load(str(out))
    assert saved.coef.shape == (1, 96) and saved.mean.shape == saved.scale.shape == (96,)
    # The Python API (as classify applies it): the fit's own test accuracy.
    featurizer = Featurizer(str(tiny_model_dir), **saved.featurization)
    saved.check(featurizer)
    with open(paths["test"], newline="") as f:
        test = list(csv.DictReader(f))
    predicted = saved.predict(featurizer.transform([row["text"] for row in test]))
    assert np.mean(predicted == np.array([row["label"] for row in test])) == pytest.approx(results["test_accuracy"])
    # Features from the cache: the same classifier.
    transfer(tiny_model_dir, paths, out, "--readout=concat_hidden", f"--features={cache}", check=True)
    np.testing.assert_array_equal(Classifier.load(str(out)).coef, saved.coef)


@pytest.mark.cli
def test_cli_multiclass_stars(tmp_path, tiny_model_dir):
    paths, out = review_csvs(tmp_path, 60, lambda r: int(r["overall"])), tmp_path / "out"
    proc = transfer(tiny_model_dir, paths, out,
                    "--readout=mean_hidden", check=True)
    results = json.loads((out / "results.json").read_text())
    assert results["labels"] == ["1", "2", "4", "5"] and "top_unit" not in results
    assert 0.0 <= results["test_macro_f1"] <= 1.0 and np.array(results["test_confusion_matrix"]).sum() == 60
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert results["readout_asked"] == "mean_hidden" and list(results["readouts"]) == ["mean_hidden"]
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
    assert proc.returncode != 0 and "junk.npz: not a cache file of this project" in last_line(proc.stderr)
    assert junk.read_text() == "not a features file"  # a file that is not ours is left alone
