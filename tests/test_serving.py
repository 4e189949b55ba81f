"""The serving graph: its text prep equals inference.encode byte for byte (tricky cases, every numeric
reference edge, every HTML5 entity, random strings, real reviews), and its probabilities equal
classify's Python path (Featurizer + Classifier.predict_proba) for every readout, 2 and 3 classes."""

import csv
import gzip
import html
import html.entities
import itertools
import random
import re

import numpy as np
import pytest
import tensorflow as tf

from horovod_mlstm import modeldir
from horovod_mlstm.classifier import Classifier
from horovod_mlstm.inference import READOUTS, TEXT_PREPS, Featurizer, encode, is_empty
from horovod_mlstm.model import ModelConfig, build_model
from horovod_mlstm.serving import ServingModel, TextPrep, whitespace

pytestmark = pytest.mark.unit

PREPS = list(TEXT_PREPS)
TRICKY = [
    "", " ", "   \t\n  ", "\n", "\u00a0", "\u2028\u3000\u00a0", "x", "&", "&&", "&;", "&#", "&#;", "&#x", "&#x;",
    "&#X;",
    # numeric references: every edge of html.unescape's rules
    "&#0;", "&#00;", "&#0", "&#1;", "&#8;", "&#9;", "&#10;", "&#11;", "&#12;", "&#13;", "&#14;", "&#31;", "&#32;",
    "&#38;", "&#38;amp;", "&#60;b&#62;x", "&#65", "&#65;", "&#065;", "&#0000000000065;", "&#65x", "&#x41", "&#x41;",
    "&#X41;", "&#x0041;", "&#x4a;", "&#x4A;", "&#126;", "&#127;", "&#128;", "&#129;", "&#141;", "&#150;", "&#157;",
    "&#159;", "&#160;", "&#xd7ff;", "&#xd800;", "&#xDBFF;", "&#xdc00;", "&#xdfff;", "&#xe000;", "&#xfdcf;",
    "&#xfdd0;", "&#xfdef;", "&#xfdf0;", "&#xfffd;", "&#xfffe;", "&#xffff;", "&#x10000;", "&#x1fffe;", "&#x1ffff;",
    "&#x10fffe;", "&#x10ffff;", "&#x110000;", "&#1114111;", "&#1114112;", "&#9999999;", "&#10000000;",
    "&#99999999999999999999999999;", "&#x00000000000000000041;", "&#xFFFFFFFFFFFFFFFFFFFF;", "&#128512;",
    "&#x1F600;", "&#55357;&#56832;", "&#x85;", "&#x2028;", "&#x3000;", "&#12288;",
    # named references: with and without ";", the longest-prefix rule, not-quite names
    "&amp", "&amp;", "&AMP;", "&ampx", "&ampx;", "&amp;amp;", "&amplt;", "&lt", "&lt;", "&ltx", "&gt&lt", "&notit;",
    "&notin;", "&notin", "&not", "&noti", "&copy2020", "&copy;", "&COPY", "&nbsp", "&nbsp;", "&nbspx", "&eacute",
    "&Eacute;", "&eacutex", "&frac12", "&frac12x", "&frac123", "&middot", "&middotx", "&curren1", "&yuml", "&iexcl!",
    "&CounterClockwiseContourIntegral;", "&CounterClockwiseContourIntegral", "&ThisIsNotAnEntityButIsLongerThan32;",
    "&aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "&a", "&a;", "&é;", "&éamp", "& amp;", "&\tamp;", "&\namp;",
    "&<amp;", "&#amp;", "&amp&amp;&amp", "&lt;b&gt;bold&lt;/b&gt;", "&lt;br /&gt;x", "AT&T", "Q&A;", "R&amp;D",
    # tags: nested, unterminated, across lines, at the 200-character limit
    "<b>bold</b>", "a<br />b", "a<br/>b", "<<b>>", "<a <b> c>", "<a\nhref='x'>y</a>", "< >", "<>", "x<y", "x>y",
    "<" + "a" * 199 + ">z", "<" + "a" * 200 + ">z", "<" + "a" * 201 + ">z", "<" + "a" * 300, "<é>é", "<😀>",
    # whitespace of every kind
    "\t tab \t", "a\r\nb", "a\x0bb\x0cc", "a\x1cb\x1dc\x1ed\x1ff", "a\x85b", "a\u1680b", "a\u2000\u200ab",
    "a\u200bb", "a\u2029b", "a\u202fb\u205fc", "\ufeffbom", "a\x00b", "  lead", "trail  ", "\u3000both\u3000",
    "mixed &nbsp; and\u00a0 and &#160;", "&#32;&#32;x&#32;", "&#9;&#10;&#13;",
    # multibyte text
    "é ü 漢字 😀 \U0010ffff", "\ud7ff\ue000",
]


@pytest.fixture(scope="module", params=PREPS)
def prep(request):
    """The text prep as the SavedModel runs it: in a graph."""
    module = TextPrep(request.param)
    return request.param, tf.function(module, input_signature=[tf.TensorSpec([None], tf.string)])


def assert_encodes(prep, texts):
    name, graph = prep
    got = graph(tf.constant(texts, tf.string)).numpy()
    wrong = [(t, g, encode(t, name)) for t, g in zip(texts, got) if g != encode(t, name)]
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, e.g. {wrong[:3]}"


def test_tricky_cases(prep):
    assert_encodes(prep, TRICKY)


def test_the_tricky_cases_are_tricky():
    """What a few of them must give (so that the table tests rules, not only agreement)."""
    texts = ["&notit; &ampx &#x110000; &#0; &#128; &#1; &#13;x", "<a <b> c> &lt;i&gt;x\u00a0\u2028y\u3000"]
    assert encode(texts[0], "radford") == "\n ¬it; &x \ufffd \ufffd €  \rx ".encode()
    assert encode(texts[1]) == b"\nc> x y"


def test_whitespace_is_pythons():
    """The RE2 class equals `\\s` of a str pattern (and str.isspace) over every code point."""
    codes = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    matched = tf.strings.regex_full_match(tf.constant([chr(c).encode() for c in codes]), whitespace()).numpy()
    assert [c for c, m in zip(codes, matched) if m] == [c for c in codes if re.fullmatch(r"\s", chr(c))]
    assert [c for c, m in zip(codes, matched) if m] == [c for c in codes if chr(c).isspace()]


def numeric_references() -> list[str]:
    """Each form of numeric reference for every code point up to U+3000, every code point in html's tables,
    every edge of the surrogates and non-characters, random ones, and numbers too large for int64."""
    rng = random.Random(1)
    planes_last = (plane * 0x10000 + 0xFFFE for plane in range(17))
    edges = {n + d for n in (0xD800, 0xDFFF, 0xFDD0, 0xFDEF, 0x10FFFF, 0x110000, *planes_last) for d in (-1, 0, 1, 2)}
    numbers = sorted({*range(0x3000), *html._invalid_charrefs, *html._invalid_codepoints, *edges,
                      *(rng.randrange(0x110000) for _ in range(3000)), 2**31, 2**63, 2**64 + 65, 10**30})
    forms = ("&#{n};", "&#{n}", "&#x{n:x};", "&#X{n:X}", "&#x000{n:x};z", "&#00{n}x")
    return [form.format(n=n) for n in numbers for form in forms]


def test_every_numeric_reference_edge():
    references = numeric_references()
    got = tf.function(TextPrep().unescape)(tf.constant(references)).numpy()
    wrong = [(r, g, html.unescape(r)) for r, g in zip(references, got) if g.decode() != html.unescape(r)]
    assert not wrong, f"{len(wrong)} of {len(references)} differ, e.g. {wrong[:3]}"


def test_every_named_entity_and_its_prefixes():
    names = [name.rstrip(";") for name in html.entities.html5]
    references = [f"&{name}{end}" for name in names for end in ("", ";", "x", "x;", "1;", " ", "é")]
    references += [f"&{name[:k]}" for name in names for k in range(1, len(name))]
    got = tf.function(TextPrep().unescape)(tf.constant(references)).numpy()
    wrong = [(r, g, html.unescape(r)) for r, g in zip(references, got) if g.decode() != html.unescape(r)]
    assert not wrong, f"{len(wrong)} of {len(references)} differ, e.g. {wrong[:3]}"


def random_texts(count: int, seed: int) -> list[str]:
    """Strings drawn from fragments rich in & # ; < > x digits whitespace and pieces of entity names."""
    rng = random.Random(seed)
    names = list(html.entities.html5)
    fragments = ["&", "&", "#", ";", "<", ">", "x", "X", "0", "1", "9", "a", "F", " ", " ", "\t", "\n", "\r", "\x0b",
                 "\x0c", "\x1c", "\x85", "\xa0", "\u1680", "\u2028", "\u2029", "\u3000", "\u200b", "é", "😀", "漢",
                 "amp", "lt", "not", "in", "&#", "&#x", "&#X", "<br />", "</b>", "\x00", "\U0010ffff", "\ufffd"]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 40)):
            r = rng.random()
            if r < 0.55:
                parts.append(rng.choice(fragments))
            elif r < 0.75:
                parts.append("&" + rng.choice(names)[:rng.randint(1, 34)])
            elif r < 0.85:
                parts.append(f"&#{rng.choice([0, 9, 13, 128, 159, 0xD800, 0x10FFFF, 0x110000, rng.randrange(2**40)])}")
            elif r < 0.9:
                parts.append(f"&#x{rng.choice([0, 0xFFFE, 0xDFFF, 0x10FFFF, 0x110000, rng.randrange(2**40)]):X}")
            else:
                parts.append(chr(rng.choice([rng.randint(0x20, 0x2FFF), rng.randint(0xE000, 0x10FFFF)])))
        texts.append("".join(parts))
    return texts


def test_random_strings(prep):
    assert_encodes(prep, random_texts(20000, seed=7))


def test_invalid_utf8_reads_as_pythons_replacement(prep):
    """Bytes that are not UTF-8 read as bytes.decode(errors="replace") reads them: U+FFFD per maximal
    invalid sequence (a SavedModel's caller may pass any bytes; classify's input is text already)."""
    name, graph = prep
    raw = [b"\xff", b"a\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xf0\x9f\x98", b"\xf4\x90\x80\x80z", b"\xc0\xaf&amp;",
           b"\xe2\x82", b"\x80\x80 x \xfe", b"&#65\xff;"]
    got = graph(tf.constant(raw)).numpy()
    assert list(got) == [encode(b.decode("utf-8", "replace"), name) for b in raw]


def read_csv_column(path, column, limit=None, opener=open):
    # csv's field limit is process-wide, and preprocess lowers it (--max_record_bytes) in the tests before.
    previous = csv.field_size_limit(1 << 24)
    try:
        with opener(path, "rt", newline="", encoding="utf-8") as f:
            return [row[column] for row in itertools.islice(csv.DictReader(f), limit)]
    finally:
        csv.field_size_limit(previous)


def test_real_reviews(prep, shared_dir):
    """Every SST sentence and 3,000 IMDB reviews (HTML line breaks, entities, long texts) as written."""
    data = shared_dir / "data"
    texts = [t for split in ("train", "dev", "test")
             for t in read_csv_column(data / "sst" / f"{split}.csv", "sentence")]
    texts += read_csv_column(data / "imdb" / "test.csv.gz", "text", limit=3000, opener=gzip.open)
    assert len(texts) > 12000 and any("<br />" in t for t in texts) and any("&" in t for t in texts)
    assert_encodes(prep, texts)


# ---------------------------------------------------------------- the serving model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained 16-unit model, written as a model dir."""
    tf.random.set_seed(3)
    return modeldir.write_model(str(tmp_path_factory.mktemp("model") / "m"),
                                build_model(ModelConfig(hidden_size=16, embed_size=8)), step=1)


def classifier_for(classes: int, readout: str, features: np.ndarray, text_prep: str = "project") -> Classifier:
    """Random weights over features standardised as transfer standardises them, so probabilities spread."""
    rng = np.random.default_rng(classes)
    rows = 1 if classes == 2 else classes
    return Classifier([f"class {i}" for i in range(classes)], rng.normal(size=(rows, features.shape[1])),
                      rng.normal(size=rows),
                      features.mean(axis=0), features.std(axis=0) + 1e-3,
                      {"featurization": {"text_prep": text_prep, "readout": readout}})


SERVED = ["Five stars &amp; a <b>great</b> sound", "", "Broke &notit; in a week. 漢字 😀 é", "   \n ",
          "<br /><br />",
          "long review " * 60, "ok", "&#128; &#x110000; Tab\there", "x" * 3]


@pytest.mark.parametrize(("readout", "classes"), zip(READOUTS, [2, 3, 2, 3, 3], strict=True))
def test_probabilities_equal_classify_in_python(model_dir, fused_kernels, classes, readout):
    featurizer = Featurizer(model_dir, "project", readout, batch_size=2, chunk=16)
    kept = [t for t in SERVED if not is_empty(t)]
    features = featurizer.transform(kept)
    classifier = classifier_for(classes, readout, features)
    expected = classifier.predict_proba(features)
    assert np.ptp(expected, axis=0).max() > 0.3  # the texts get different probabilities: the test can fail
    module = ServingModel(featurizer.model, classifier, batch_size=2, chunk=16)
    served = module.classify(tf.constant(SERVED))
    probabilities, labels = served["probabilities"].numpy(), served["label"].numpy()
    assert features.shape[1] == (48 if readout == "concat_hidden" else 16)  # a 16-unit model
    assert probabilities.shape == (len(SERVED), classes) and probabilities.dtype == np.float32
    rows = [i for i, t in enumerate(SERVED) if not is_empty(t)]
    np.testing.assert_allclose(probabilities[rows], expected, atol=1e-6)
    assert [labels[i].decode() for i in rows] == classifier.predict(features).tolist()
    # Texts with nothing left after their prep: NaN probabilities and no label, as classify leaves them.
    empty = [i for i in range(len(SERVED)) if i not in rows]
    assert empty == [1, 3, 4] and np.isnan(probabilities[empty]).all() and list(labels[empty]) == [b""] * 3


def test_batches_of_no_text_only_empty_texts_and_one_text(model_dir):
    featurizer = Featurizer(model_dir, "radford", "final_cell")
    classifier = classifier_for(3, "final_cell", featurizer.transform(SERVED[:3]), "radford")
    served = ServingModel(featurizer.model, classifier)
    for texts in ([], [""], ["", " \u3000 "]):
        out = served.classify(tf.constant(texts, tf.string))
        assert out["probabilities"].shape == (len(texts), 3) and out["label"].shape == (len(texts),)
        assert np.isnan(out["probabilities"].numpy()).all() and (out["label"].numpy() == b"").all()
    out = served.classify(tf.constant(["one"]))
    np.testing.assert_allclose(out["probabilities"].numpy().sum(), 1.0, rtol=1e-6)
    assert out["label"].numpy()[0].decode() in classifier.labels


def graph_ops(function, *args) -> set[str]:
    """Every op type in a tf.function's graph, its nested functions' included."""
    graph = function.get_concrete_function(*args).graph.as_graph_def()
    return {node.op for node in graph.node} | {node.op for f in graph.library.function for node in f.node_def}


def test_the_graph_uses_no_fused_kernel(model_dir, fused_kernels):
    """Even where the project's kernels are built (and the Featurizer uses them), the serving graph is
    TensorFlow's own ops: a SavedModel's user has no kernel library."""
    featurizer = Featurizer(model_dir)
    model = featurizer.model
    featurised = graph_ops(featurizer._read, tf.zeros([4], tf.uint8), tf.constant([4]))
    assert {op for op in featurised if op.startswith("Mlstm")}  # what the check below would find
    module = ServingModel(model, classifier_for(2, "final_cell", featurizer.transform(SERVED[:3])))
    served = graph_ops(module.classify)
    assert {"Tanh", "StaticRegexReplace"} <= served and served & {"While", "StatelessWhile"}
    assert not {op for op in served if op.startswith("Mlstm")}


def test_a_mixed_bfloat16_model_saves_and_loads(tmp_path, fused_kernels):
    """The bfloat16 casts and Keras' autocast variables survive a SavedModel, and its probabilities are
    classify's, whose fused kernels add the gate pre-activations in float32 as TensorFlow's ops do."""
    model_dir = modeldir.write_model(str(tmp_path / "m"), build_model(ModelConfig(16, 8, precision="mixed_bfloat16")), 1)
    featurizer = Featurizer(model_dir)
    kept = [t for t in SERVED if not is_empty(t)]
    features = featurizer.transform(kept)
    classifier = classifier_for(3, "final_cell", features)
    module = ServingModel(featurizer.model, classifier)
    tf.saved_model.save(module, str(tmp_path / "saved"), signatures={"serving_default": module.classify})
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    served = loaded.signatures["serving_default"](texts=tf.constant(SERVED))["probabilities"].numpy()
    np.testing.assert_array_equal(served, module.classify(tf.constant(SERVED))["probabilities"].numpy())
    rows = [i for i, t in enumerate(SERVED) if not is_empty(t)]
    np.testing.assert_allclose(served[rows], classifier.predict_proba(features), atol=1e-5)
