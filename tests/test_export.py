"""export: the SavedModel, loaded by a process that has TensorFlow and not this package (nor its kernel
library), gives classify's probabilities for 2 and 3 classes, both text preps, texts of every kind in one
batch; the output is written whole and a non-empty one is replaced only when asked; bad input is one line."""

import csv
import json
import os
import shutil
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from conftest import PYTHON, fitted_classifier, last_line, python, run
from horovod_mlstm import corpus, modeldir
from horovod_mlstm.classifier import Classifier
from horovod_mlstm.export import EXTRA, check_output, load, save
from horovod_mlstm.files import NotWritable
from horovod_mlstm.inference import Featurizer
from horovod_mlstm.model import ModelConfig, build_model
from horovod_mlstm.textfiles import InputError

TEXTS = [
    "Five stars &amp; a <b>great</b> sound &mdash; my son loves it!",
    "",
    "Broke in a week&hellip; &#x1F620; returned it.<br /><br />Never again.",
    "   \n\t ",
    "ok",
    "漢字 é ü Ωmega — “quotes” 😀 and\u00a0NBSP\u2028line\u3000space",
    "&notit; &ampx &#128; &#x110000; &#0; AT&T Q&A &lt;i&gt;escaped tags&lt;/i&gt;",
    "<br /><br />",
    "line one\nline two\r\n\ttabbed   spaces",
    " ".join(r["reviewText"] for r in corpus.reviews(40, seed=9)),  # thousands of bytes
    "<p>only <i>tags</i> around</p>",
    "x",
]

# Run with python -I from a directory outside the repository: no PYTHONPATH, no script directory of ours. The
# editable install of this package is still on sys.path, so its import is refused outright.
LOADER = textwrap.dedent("""
    import importlib.abc, json, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "horovod_mlstm":
                raise ModuleNotFoundError(f"{name} is not importable here")

    sys.meta_path.insert(0, Refuse())
    import tensorflow as tf

    saved, texts = sys.argv[1], json.load(open(sys.argv[2]))
    model = tf.saved_model.load(saved)
    out = model.signatures["serving_default"](texts=tf.constant(texts, tf.string))
    with open("/proc/self/maps") as f:
        kernels = [line for line in f if "_kernels-" in line]
    print(json.dumps({"probabilities": out["probabilities"].numpy().tolist(),
                      "label": [v.decode() for v in out["label"].numpy()],
                      "labels": [v.decode() for v in model.labels.numpy()],
                      "modules": [m for m in sys.modules if m.partition(".")[0] == "horovod_mlstm"],
                      "kernels": kernels}))
""")

# name: (how labels come from stars, transfer flags)
TASKS = {
    "2 classes, project prep": (lambda stars: "pos" if stars >= 4 else "neg", []),
    "3 classes, radford prep": (lambda stars: {5: "great", 4: "good"}.get(stars, "bad"),
                                ["--text_prep=radford", "--readout=mean_hidden"]),
    "2 classes, concat_hidden": (lambda stars: "pos" if stars >= 4 else "neg", ["--readout=concat_hidden"]),
}


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, tiny_model_dir) -> dict:
    """{task: directory of a classifier transfer fitted on synthetic reviews with the tiny model}."""
    dirs = {}
    for task, (label_of, transfer_flags) in TASKS.items():
        dirs[task] = fitted_classifier(tmp_path_factory.mktemp("classifier"), tiny_model_dir, label_of, 90, 300,
                                       *transfer_flags)
    return dirs


def export(classifier, output, *extra, **kw):
    return python("-m", "horovod_mlstm.export", f"--classifier={classifier}", f"--output={output}", *extra, **kw)


@pytest.mark.cli
@pytest.mark.parametrize("task", list(TASKS))
def test_the_saved_model_gives_classifys_probabilities_without_this_package(tmp_path, tiny_model_dir, classifiers,
                                                                            task):
    classifier_dir = classifiers[task]
    source = tmp_path / "texts.csv"
    with open(source, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text"], *([t] for t in TEXTS)])
    python("-m", "horovod_mlstm.classify", f"--model_dir={tiny_model_dir}", f"--classifier={classifier_dir}",
           f"--input={source}", f"--output={tmp_path / 'labels.csv'}", "--text_column=text", check=True)
    with open(tmp_path / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # Small batches and pieces inside the SavedModel (classify read 32 texts in 256-byte pieces): the same results.
    saved = tmp_path / "exported"
    proc = export(classifier_dir, saved, "--batch_size_per_worker=3", "--seq_length=64", check=True)
    assert str(saved) in proc.stdout and "tf.saved_model.load" in proc.stdout
    assert (saved / "saved_model.pb").is_file() and (saved / EXTRA / "classifier.json").is_file()
    assert b"Mlstm" not in (saved / "saved_model.pb").read_bytes()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "texts.json").write_text(json.dumps(TEXTS))
    (elsewhere / "load.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    loaded = run([PYTHON, "-I", "load.py", str(saved), "texts.json"], cwd=elsewhere, env=env, check=True)
    served = json.loads(last_line(loaded.stdout))
    assert served["modules"] == [] and served["kernels"] == []

    labels = json.loads((classifier_dir / "classifier.json").read_text())["labels"]
    assert served["labels"] == labels and list(rows[0])[2:] == [f"p_{label}" for label in labels]
    probabilities = np.array(served["probabilities"], dtype=np.float64)
    assert probabilities.shape == (len(TEXTS), len(labels))
    written = [i for i, row in enumerate(rows) if row["label"]]
    assert 1 <= len(TEXTS) - len(written) <= 3  # some texts are empty after the prep: classify left them unlabelled
    expected = np.array([[float(rows[i][f"p_{label}"]) for label in labels] for i in written])
    np.testing.assert_allclose(probabilities[written], expected, atol=1e-5)  # the CSV has 6 decimals
    assert np.ptp(expected, axis=0).max() > 1e-3  # texts differ, so a mix-up of rows would show
    assert [served["label"][i] for i in written] == [rows[i]["label"] for i in written]
    empty = [i for i in range(len(TEXTS)) if i not in written]
    assert np.isnan(probabilities[empty]).all() and all(served["label"][i] == "" for i in empty)


@pytest.mark.cli
def test_a_model_dir_of_other_weights_is_one_line_and_writes_nothing(tmp_path, classifiers):
    other = modeldir.write_model(str(tmp_path / "other"), build_model(ModelConfig(hidden_size=32, embed_size=8)), 1)
    proc = export(classifiers["2 classes, project prep"], tmp_path / "out", f"--model_dir={other}")
    assert proc.returncode != 0 and last_line(proc.stderr).startswith("error: the classifier was fitted on features of")
    assert os.listdir(tmp_path) == ["other"]  # no output, no staging directory


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(model dir, classifier dir): a classifier saved with the identity of an untrained model's weights."""
    work = tmp_path_factory.mktemp("fitted")
    model_dir = modeldir.write_model(str(work / "model"), build_model(ModelConfig(hidden_size=8, embed_size=4)), 1)
    identity = Featurizer(model_dir).identity()
    Classifier(["neg", "pos"], np.ones((1, 8)), np.zeros(1), np.zeros(8), np.ones(8),
               {"featurization": {"text_prep": "project", "readout": "final_cell"}, "model_dir": identity["model_dir"],
                "checkpoint": {k: identity[k] for k in modeldir.IDENTITY_KEYS}}).save(str(work))
    return model_dir, work


@pytest.mark.unit
def test_the_model_dir_is_the_classifiers_and_must_hold_its_weights(tmp_path, fitted):
    model_dir, classifier_dir = fitted
    classifier, featurizer = load(str(classifier_dir))
    assert featurizer.model_dir == model_dir and classifier.labels == ["neg", "pos"]
    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved)
    assert load(str(classifier_dir), str(moved))[1].model_dir == str(moved)  # same weights elsewhere: accepted
    other = modeldir.write_model(str(tmp_path / "other"), build_model(ModelConfig(hidden_size=8, embed_size=4)), 1)
    with pytest.raises(InputError, match="the classifier was fitted on features of"):
        load(str(classifier_dir), other)
    with pytest.raises(InputError, match="no such classifier file"):
        load(str(tmp_path / "missing"))
    info = json.loads((classifier_dir / "classifier.json").read_text())
    (tmp_path / "c").mkdir()
    shutil.copy(classifier_dir / "classifier.npz", tmp_path / "c")
    (tmp_path / "c" / "classifier.json").write_text(json.dumps({**info, "model_dir": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match=r"names the model dir .*gone, which does not exist \(moved\?\): pass"):
        load(str(tmp_path / "c"))


@pytest.mark.unit
def test_an_output_that_is_a_file_or_not_empty_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotWritable, match="is a file"):
        check_output(str(tmp_path / "file"), overwrite=True)
    with pytest.raises(NotWritable, match=r"is not empty \(pass --overwrite"):
        check_output(str(tmp_path / "full"), overwrite=False)
    with pytest.raises(NotWritable, match="does not exist"):
        check_output(str(tmp_path / "no" / "dir"), overwrite=False)
    check_output(str(tmp_path / "full"), overwrite=True)
    check_output(str(tmp_path / "empty"), overwrite=False)
    check_output(str(tmp_path / "new"), overwrite=False)


class Doubler(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def classify(self, x):
        return {"y": 2 * x}


@pytest.mark.unit
@pytest.mark.parametrize("existing", ["absent", "empty", "full"])
def test_the_saved_model_replaces_the_output_whole(tmp_path, existing):
    output = tmp_path / "exported"
    if existing != "absent":
        output.mkdir()
    if existing == "full":
        (output / "old_file").write_text("from an earlier export")
    (tmp_path / "classifier.json").write_text("{}")
    save(Doubler(), str(output), str(tmp_path / "classifier.json"))
    assert sorted(os.listdir(tmp_path)) == ["classifier.json", "exported"]  # no staging or old copy left
    assert sorted(os.listdir(output)) == sorted([EXTRA, "assets", "fingerprint.pb", "saved_model.pb", "variables"])
    loaded = tf.saved_model.load(str(output))
    assert loaded.signatures["serving_default"](x=tf.constant([1.5]))["y"].numpy().tolist() == [3.0]
    assert oct(output.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
