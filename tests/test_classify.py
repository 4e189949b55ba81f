"""classify: labels new texts with transfer's classifier, in input order, from CSV, JSON lines or plain text
(plain or gzipped), the same as the two-line Python API; bad input and a mismatched model are one-line errors."""

import csv
import gzip
import json
import shutil

import numpy as np
import pytest

from conftest import last_line, python
from horovod_mlstm import corpus
from horovod_mlstm.classifier import Classifier
from horovod_mlstm.inference import Featurizer
from horovod_mlstm.textfiles import InputError, check_writable, read_texts

TEXTS = ["Five stars. It works great and the sound is lovely.", "Broke in a week, returned it.", "",
         "Terrible &amp; cheap.\nNever again.", "Wonderful gift, my son loves it."]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny_model_dir):
    """A binary classifier fitted by transfer on synthetic reviews with the tiny model."""
    work = tmp_path_factory.mktemp("classifier")
    paths = {}
    for seed, split in enumerate(("train", "val", "test")):
        paths[split] = work / f"{split}.csv"
        with open(paths[split], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "text"])
            writer.writerows(("pos" if r["overall"] >= 4 else "neg", r["reviewText"])
                             for r in corpus.reviews(60, seed=200 + seed))
    python("-m", "horovod_mlstm.transfer", f"--model_dir={tiny_model_dir}", f"--train={paths['train']}",
           f"--val={paths['val']}", f"--test={paths['test']}", "--text_column=text", f"--output_dir={work / 'out'}",
           check=True)
    return work / "out"


def classify(model_dir, classifier, path, out, *extra, **kw):
    return python("-m", "horovod_mlstm.classify", f"--model_dir={model_dir}", f"--classifier={classifier}",
                  f"--input={path}", f"--output={out}", *extra, **kw)


def read_output(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.cli
def test_csv_input_matches_the_python_api_in_input_order(tmp_path, tiny_model_dir, classifier_dir):
    source = tmp_path / "in.csv"
    with open(source, "w", newline="", encoding="utf-8-sig") as f:  # with a BOM, as spreadsheets write
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows(enumerate(TEXTS))
    proc = classify(tiny_model_dir, classifier_dir / "classifier.json", source, tmp_path / "out.csv",
                    "--text_column=text", check=True)
    rows = read_output(tmp_path / "out.csv")
    assert [r["index"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert list(rows[0]) == ["index", "label", "p_neg", "p_pos"]
    # The empty text is kept in its place, unlabelled.
    assert rows[2]["label"] == "" and rows[2]["p_neg"] == ""
    assert last_line(proc.stdout).startswith("[classify] 5 texts (1 empty, left unlabelled)")
    assert "texts/s" in last_line(proc.stdout)
    assert "text/s" in proc.stderr  # tqdm's progress

    classifier = Classifier.load(str(classifier_dir))
    kept = [t for t in TEXTS if t]
    features = Featurizer(str(tiny_model_dir), **classifier.featurization).transform(kept)
    probabilities = classifier.predict_proba(features)
    written = [r for r in rows if r["label"]]
    np.testing.assert_allclose([[float(r["p_neg"]), float(r["p_pos"])] for r in written], probabilities, atol=2e-6)
    assert [r["label"] for r in written] == classifier.predict(features).tolist()


@pytest.mark.cli
@pytest.mark.parametrize("kind", ["jsonl", "txt"])
def test_gzipped_json_lines_and_plain_text(tmp_path, tiny_model_dir, classifier_dir, kind):
    texts = [t.replace("\n", " ") for t in TEXTS if t]
    source = tmp_path / f"in.{kind}.gz"
    lines = [json.dumps({"review": t, "stars": 5}) for t in texts] if kind == "jsonl" else texts
    source.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    extra = ["--text_field=review"] if kind == "jsonl" else []
    classify(tiny_model_dir, classifier_dir, source, tmp_path / "out.csv", *extra, check=True)
    rows = read_output(tmp_path / "out.csv")
    assert len(rows) == len(texts) and all(r["label"] in ("neg", "pos") for r in rows)
    assert all(abs(float(r["p_neg"]) + float(r["p_pos"]) - 1) < 1e-5 for r in rows)


@pytest.mark.unit
@pytest.mark.parametrize("name, content, kw, message", [
    ("a.csv", "id,body\n1,x\n", {"text_column": "text"}, r"a.csv:1: no column 'text' \(columns: id, body\)"),
    ("a.csv", "id,text\n1,x\n2\n", {"text_column": "text"}, r"a.csv:3: row has 1 fields, the header has 2"),
    ("a.jsonl", '{"text": "x"}\n{"body": "y"}\n', {"text_field": "text"}, r"a.jsonl:2: no text field 'text'"),
    ("a.jsonl", '{"text": "x"}\n{broken\n', {"text_field": "text"}, r"a.jsonl:2: not valid JSON"),
    ("a.txt", "", {}, r"a.txt: no texts"),
    ("a.txt", b"fine\ncaf\xe9\n", {}, r"a.txt:2: not valid utf-8-sig \(byte 0xe9\)"),
    ("a.txt.gz", b"not gzip at all", {}, r"a.txt.gz: cannot read"),
    ("a.csv", "text\nx\n", {}, r"a.csv: looks like CSV or JSON lines"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path, name, content, kw, message):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(InputError, match=message):
        read_texts(str(path), **kw)
    with pytest.raises(InputError, match="is a directory"):
        read_texts(str(tmp_path))
    with pytest.raises(InputError, match="cannot write there"):
        check_writable(str(tmp_path / "no_such_dir" / "out.csv"))


@pytest.mark.cli
def test_classifier_from_another_version_or_checkpoint_is_refused(tmp_path, tiny_model_dir, classifier_dir):
    from horovod_mlstm.checkpoint import Checkpointer
    from horovod_mlstm.inference import load_trained_model

    copy = tmp_path / "classifier"
    shutil.copytree(classifier_dir, copy)
    meta = json.loads((copy / "classifier.json").read_text())
    (copy / "classifier.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(InputError, match="classifier format version 99, this horovod_mlstm reads version 1"):
        Classifier.load(str(copy))

    other = tmp_path / "other_model"  # the same model after one more (fake) update: other weights
    shutil.copytree(tiny_model_dir, other)
    model = load_trained_model(str(other))
    model.out.bias.assign_add(np.ones(256, np.float32))
    Checkpointer(str(other), model=model).save(21)
    source = tmp_path / "in.txt"
    source.write_text("good\n")
    proc = classify(other, classifier_dir, source, tmp_path / "out.csv")
    assert proc.returncode != 0
    line = last_line(proc.stderr)
    assert line.startswith("error: the classifier was fitted on features of ") and "ckpt-20" in line \
        and "ckpt-21" in line and str(other) in line
    proc = classify(tiny_model_dir, classifier_dir, source, tmp_path / "out.csv", "--text_prep=radford")
    assert proc.returncode != 0 and last_line(proc.stderr) == (
        "error: --text_prep=radford conflicts with the classifier, which was fitted with text_prep=project "
        "(leave --text_prep out to use it)")
    assert not (tmp_path / "out.csv").exists()
