"""classify: labels new texts with transfer's classifier, in input order, from CSV, JSON lines or plain text
(plain or gzipped), streamed a window at a time, the same as the two-line Python API; bad input, a classifier
whose two files do not belong together and a mismatched model are one-line errors."""

import csv
import gzip
import io
import json
import shutil
import types

import numpy as np
import pytest

from conftest import fitted_classifier, last_line, python
from horovod_mlstm import files
from horovod_mlstm.classifier import Classifier
from horovod_mlstm.classify import label_all, settings_from
from horovod_mlstm.inference import Featurizer
from horovod_mlstm.textfiles import BLOCK, InputError, csv_rows, texts

TEXTS = ["Five stars. It works great and the sound is lovely.", "Broke in a week, returned it.", "",
         "Terrible &amp; cheap.\nNever again.", "Wonderful gift, my son loves it."]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny_model_dir):
    """A binary classifier fitted by transfer (readout auto) on synthetic reviews with the tiny model."""
    return fitted_classifier(tmp_path_factory.mktemp("classifier"), tiny_model_dir,
                             lambda stars: "pos" if stars >= 4 else "neg", 60, 200)


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

    # A bad row stops the run before any work, with one line, and the earlier output stays.
    source.write_text("id,text\n1,fine\n2\n")
    proc = classify(tiny_model_dir, classifier_dir, source, tmp_path / "out.csv", "--text_column=text")
    assert proc.returncode != 0 and last_line(proc.stderr) == f"error: {source}:3: row has 1 fields, the header has 2"
    assert read_output(tmp_path / "out.csv") == rows


@pytest.fixture(scope="module")
def featurizer_and_classifier(tiny_model_dir, classifier_dir):
    classifier = Classifier.load(str(classifier_dir))
    return Featurizer(str(tiny_model_dir), **classifier.featurization, batch_size=2), classifier


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["jsonl", "txt"])
def test_gzipped_json_lines_and_plain_text(tmp_path, featurizer_and_classifier, kind):
    featurizer, classifier = featurizer_and_classifier
    lines = [t.replace("\n", " ") for t in TEXTS]
    source = tmp_path / f"in.{kind}.gz"
    rows = [json.dumps({"review": t, "stars": 5}) for t in lines if t] if kind == "jsonl" else lines
    source.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    output, done = io.StringIO(), []
    total, empty = label_all(featurizer, classifier, texts(str(source), text_field="review" if kind == "jsonl" else ""),
                             output, done.append)
    written = list(csv.DictReader(io.StringIO(output.getvalue())))
    assert (total, empty) == ((4, 0) if kind == "jsonl" else (5, 1)) and len(written) == total == sum(done)
    labelled = [r for r in written if r["label"]]
    assert all(r["label"] in ("neg", "pos") for r in labelled) and len(labelled) == 4
    assert all(abs(float(r["p_neg"]) + float(r["p_pos"]) - 1) < 1e-5 for r in labelled)


@pytest.mark.unit
def test_rows_are_written_window_by_window_as_the_input_is_read(featurizer_and_classifier):
    """Memory follows the window, not the input: a window's rows are out before the next texts are read."""
    featurizer, classifier = featurizer_and_classifier
    window = featurizer.window

    def endless():
        for i in range(window):
            yield TEXTS[i % len(TEXTS)]
        raise InputError("in.txt:99: stopped reading here")

    output = io.StringIO()
    with pytest.raises(InputError, match="stopped reading here"):
        label_all(featurizer, classifier, endless(), output)
    written = list(csv.DictReader(io.StringIO(output.getvalue())))
    assert [int(r["index"]) for r in written] == list(range(window))
    assert [r["label"] == "" for r in written[:len(TEXTS)]] == [t == "" for t in TEXTS]


@pytest.mark.unit
@pytest.mark.parametrize("name, content, kw, message", [
    ("a.csv", "id,body\n1,x\n", {"text_column": "text"}, r"a.csv:1: no column 'text' \(columns: id, body\)"),
    ("a.csv", "id,text\n1,x\n2\n", {"text_column": "text"}, r"a.csv:3: row has 1 fields, the header has 2"),
    ("a.jsonl", '{"text": "x"}\n{"body": "y"}\n', {"text_field": "text"}, r"a.jsonl:2: no text field 'text'"),
    ("a.jsonl", '{"text": "x"}\n{broken\n', {"text_field": "text"}, r"a.jsonl:2: not valid JSON"),
    pytest.param("a.jsonl", '{"text": "x"}\n\n' + "[" * 100_000 + "\n", {"text_field": "text"},
                 r"a.jsonl:3: JSON nested too deeply to read", id="json-nested-100k-deep"),
    ("a.txt", "", {}, r"a.txt: no texts"),
    ("a.txt", b"fine\ncaf\xe9\n", {}, r"a.txt:2: not valid utf-8-sig \(byte 0xe9\)"),
    pytest.param("a.txt", b"ok\n" * (BLOCK // 3 + 5) + b"caf\xe9\n", {},
                 rf"a.txt:{BLOCK // 3 + 6}: not valid utf-8-sig", id="decode-error-in-the-second-block"),
    ("a.txt", b"text", {"encoding": "klingon"}, r"unknown encoding 'klingon'"),
    ("a.txt.gz", b"not gzip at all", {}, r"a.txt.gz: cannot read"),
    pytest.param("a.txt.gz", gzip.compress(b"a\n" * 1000)[:-12], {}, r"a.txt.gz: cannot read", id="truncated-gzip"),
    ("a.csv", "text\nx\n", {}, r"a.csv: looks like CSV or JSON lines"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path, name, content, kw, message):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(InputError, match=message):
        list(texts(str(path), **kw))
    with pytest.raises(InputError, match="is a directory"):
        list(texts(str(tmp_path)))
    with pytest.raises(InputError, match="no such file"):
        list(texts(str(tmp_path / "absent.txt")))
    with pytest.raises(files.NotWritable, match="cannot write there"):
        files.check_writable(str(tmp_path / "no_such_dir" / "out.csv"), "--output")


@pytest.mark.unit
def test_texts_stream_from_the_file_across_blocks(tmp_path):
    """Texts come out as the file is read (a bad line far down fails only when reached), and a line, a CRLF,
    a multi-byte character or a BOM cut by a block boundary reads as if the file were read whole."""
    long_line = "é" * BLOCK  # two bytes a character: crosses two block boundaries, one inside a character
    path = tmp_path / "in.txt"
    filler = BLOCK // 3 + 1  # "ok\n" lines: more than a block between "last" and the bad byte
    path.write_bytes("\ufeffshort\r\n".encode() + long_line.encode() + b"\nlast\n" + b"ok\n" * filler + b"\xff\n")
    stream = texts(str(path))
    assert next(stream) == "short"  # the BOM read as a BOM, the \r dropped as before
    assert next(stream) == long_line and next(stream) == "last"
    with pytest.raises(InputError, match=rf"in.txt:{4 + filler}: not valid utf-8-sig \(byte 0xff\)"):
        list(stream)

    content = 'id,text\r\n1,"a\r\nquoted, multi-line text"\r\n'  # csv's own \r\n line ends
    expected = ["a\r\nquoted, multi-line text"]
    while len(content) < BLOCK - 2000:  # rows up to just before the first block's end
        expected.append("x" * 1000)
        content += f"{len(expected)},{expected[-1]}\r\n"
    expected.append("y" * (BLOCK - 1 - len(content) - len(f"{len(expected) + 1},")))
    content += f"{len(expected)},{expected[-1]}\r\n"  # its \r ends the first block, its \n starts the next
    expected.append("after")
    content += f"{len(expected)},after\r\n"
    (tmp_path / "in.csv").write_bytes(content.encode())
    assert content.encode()[BLOCK - 1:BLOCK + 1] == b"\r\n"
    assert list(texts(str(tmp_path / "in.csv"), text_column="text")) == expected
    # a "\r\n" cut by the block boundary is one line end, not two: "after" is on line 2 + its row number
    assert list(csv_rows(str(tmp_path / "in.csv"), ["text"], "utf-8"))[-1] == (len(expected) + 2, ["after"])
    (tmp_path / "mac.csv").write_text("id,text\r1,old\r2,mac\r")  # lone \r line ends, as csv reads them
    assert list(texts(str(tmp_path / "mac.csv"), text_column="text")) == ["old", "mac"]
    (tmp_path / "le.txt").write_bytes("one\ntwo\n\nthree".encode("utf-16"))
    assert list(texts(str(tmp_path / "le.txt"), encoding="utf-16")) == ["one", "two", "", "three"]


@pytest.mark.unit
def test_a_classifier_whose_files_do_not_belong_together_is_refused(tmp_path, monkeypatch):
    """classifier.npz and classifier.json are one unit: weights under another fit's JSON are refused."""
    def classifier(seed):
        rng = np.random.default_rng(seed)
        return Classifier(["neg", "pos"], rng.normal(size=(1, 4)), rng.normal(size=1), rng.normal(size=4),
                          rng.uniform(1, 2, 4), {"featurization": {"text_prep": "project", "readout": "final_cell"},
                                                 "checkpoint": {}, "model_dir": "m"})

    old, new = tmp_path / "old", tmp_path / "new"
    for folder, seed in ((old, 0), (new, 1)):
        folder.mkdir()
        classifier(seed).save(str(folder))
    np.testing.assert_array_equal(Classifier.load(str(new)).coef, classifier(1).coef)

    mixed = tmp_path / "mixed"  # new weights beside the old JSON: what a kill between the two renames leaves
    shutil.copytree(old, mixed)
    shutil.copy(new / "classifier.npz", mixed / "classifier.npz")
    with pytest.raises(InputError, match=r"classifier.npz is not the weights .*classifier.json was saved with .*"
                                         r"refit with transfer"):
        Classifier.load(str(mixed))

    # The same from a save that fails between the two files: the old pair was replaced in part.
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "write_json", disk_full)
    with pytest.raises(OSError):
        classifier(1).save(str(old))
    monkeypatch.undo()
    with pytest.raises(InputError, match="refit with transfer"):
        Classifier.load(str(old))

    # Version 1 (before the tie) is still read; a version-1 JSON beside a version-2 .npz is a half-replaced pair.
    v1 = tmp_path / "v1"
    v1.mkdir()
    fit = classifier(2)
    np.savez(v1 / "classifier.npz", coef=fit.coef, intercept=fit.intercept, mean=fit.mean, scale=fit.scale)
    (v1 / "classifier.json").write_text(json.dumps({"format": "horovod_mlstm.classifier", "version": 1,
                                                    "labels": fit.labels, **fit.info}))
    np.testing.assert_array_equal(Classifier.load(str(v1)).predict_proba(np.ones((3, 4))),
                                  fit.predict_proba(np.ones((3, 4))))
    shutil.copy(new / "classifier.npz", v1 / "classifier.npz")
    with pytest.raises(InputError, match=r"\(version 2\) is not the weights .* \(version 1\) was saved with"):
        Classifier.load(str(v1))


@pytest.mark.unit
def test_classifier_from_another_version_or_checkpoint_is_refused(tmp_path, tiny_model_dir, classifier_dir,
                                                                  featurizer_and_classifier):
    from horovod_mlstm.checkpoint import Checkpointer
    from horovod_mlstm.inference import load_trained_model

    featurizer, classifier = featurizer_and_classifier
    classifier.check(featurizer)
    copy = tmp_path / "classifier"
    shutil.copytree(classifier_dir, copy)
    meta = json.loads((copy / "classifier.json").read_text())
    (copy / "classifier.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(InputError, match="classifier format version 99, this horovod_mlstm reads versions 1 and 2"):
        Classifier.load(str(copy))
    (copy / "classifier.json").write_text("[" * 100_000)
    with pytest.raises(InputError, match="not a classifier file"):
        Classifier.load(str(copy))

    other = tmp_path / "other_model"  # the same model after one more (fake) update: other weights
    shutil.copytree(tiny_model_dir, other)
    model = load_trained_model(str(other))
    model.out.bias.assign_add(np.ones(256, np.float32))
    Checkpointer(str(other), model=model).save(21)
    with pytest.raises(InputError) as refused:
        classifier.check(Featurizer(str(other), **classifier.featurization))
    message = str(refused.value)
    assert message.startswith("the classifier was fitted on features of ") and "ckpt-20" in message \
        and "ckpt-21" in message and str(other) in message

    given = {"text_prep": types.SimpleNamespace(value="radford"), "readout": types.SimpleNamespace(value=None)}
    with pytest.raises(InputError) as conflict:
        settings_from(classifier, given)
    assert str(conflict.value) == ("--text_prep=radford conflicts with the classifier, which was fitted with "
                                   "text_prep=project (leave --text_prep out to use it)")
    given["text_prep"].value = None
    assert settings_from(classifier, given) == classifier.featurization
