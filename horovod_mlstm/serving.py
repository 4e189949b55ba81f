"""A classifier that transfer fitted, as TensorFlow ops alone: raw texts in, class probabilities out.

classify prepares texts in Python (inference.encode), reads them with the model and applies the
classifier with NumPy. A SavedModel holds only graph ops (a tf.py_function is not saved with it), so
this module writes each step as ops, for export to save:

    TextPrep(text_prep)(texts)       the bytes the model reads, equal to inference.encode byte for byte
    ServingModel(model, classifier)  texts -> probabilities [N, classes] and label [N], as a tf.Module

The text prep reproduces Python's own algorithms, not an approximation of them: html.unescape of
Python 3.11 (its character-reference regex, its numeric-reference tables and the whole HTML5
named-entity table with its longest-prefix rule, taken from the running Python when the graph is
built), records.clean's tag regex, and Python's Unicode whitespace for `\\s` and str.strip() (RE2's
`\\s` is ASCII only, so the characters are listed). Input that is not valid UTF-8 is first decoded
with U+FFFD for each maximal invalid sequence, as Python's bytes.decode(errors="replace") does.

The model reads with the featuriser's graph (inference.read_texts) and TensorFlow's own gate math
(fused=False): the project's fused CPU kernels are a custom op library that a SavedModel's user
would not have.
"""

from __future__ import annotations

import functools
import html
import html.entities

import numpy as np
import tensorflow as tf

from horovod_mlstm.classifier import Classifier
from horovod_mlstm.inference import READOUTS, TEXT_PREPS, read_texts, readout_values
from horovod_mlstm.model import LanguageModel
from horovod_mlstm.records import _TAG

# Python's own html.unescape pattern (RE2 reads it the same: leftmost-first alternation, counted
# repetition of code points). Its tables come from the same module, so the graph follows the Python
# it is built with; the project's Python is 3.11 (pyproject.toml).
CHARREF = html._charref.pattern
TAG = _TAG.pattern  # records.clean's; RE2's [^>] also matches a newline, as Python's does
# Cut marks around each character reference: a byte that valid UTF-8 never holds, so no text holds it.
MARK = b"\xff"
REPLACEMENT_CHARACTER = 0xFFFD
LARGEST_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
DIGITS, HEX_DIGITS = len(str(LARGEST_CODE_POINT)), len(f"{LARGEST_CODE_POINT:x}")  # 7 and 6


@functools.cache
def whitespace() -> str:
    """Python's whitespace (str.isspace, which `\\s` in a str pattern and str.strip() use) as an RE2 class."""
    runs = []  # [first, last] code points of each run of consecutive whitespace characters
    for code in range(LARGEST_CODE_POINT + 1):
        if chr(code).isspace():
            if runs and runs[-1][1] == code - 1:
                runs[-1][1] = code
            else:
                runs.append([code, code])
    return "[" + "".join(f"\\x{{{a:x}}}" + (f"-\\x{{{b:x}}}" if b > a else "") for a, b in runs) + "]"


def _numeric_replacements() -> dict[int, str]:
    """Numbers whose reference is not simply chr(number): the invalid-charref table, and invalid code points to ""."""
    return {**{code: "" for code in html._invalid_codepoints}, **html._invalid_charrefs}


class TextPrep(tf.Module):
    """inference.encode(text, text_prep) as graph ops: strings [N] in, the bytes the model reads [N] out.

    `clean` is the text after its prep, unframed ("" where nothing is left: classify leaves such a
    text unlabelled); calling the module frames it as the model reads it.
    """

    def __init__(self, text_prep: str = "project"):
        super().__init__(name=f"text_prep_{text_prep}")
        if text_prep not in TEXT_PREPS:
            raise ValueError(f"text_prep must be one of {list(TEXT_PREPS)}, got {text_prep!r}")
        self.text_prep = text_prep
        _, self.before, self.after = TEXT_PREPS[text_prep]
        names = list(html.entities.html5)
        self.entity_names = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(names, tf.range(len(names), dtype=tf.int64)), default_value=-1)
        self.entity_values = tf.constant([html.entities.html5[name] for name in names])
        # Prefixes the longest-prefix rule can find: names without a final ";" (the legacy ones).
        legacy = [len(name) for name in names if not name.endswith(";")]
        self.prefix_lengths = range(min(legacy), max(legacy) + 1)
        special = _numeric_replacements()
        self.special_numbers = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(list(special), tf.int64),
                                                tf.range(len(special), dtype=tf.int64)), default_value=-1)
        self.special_values = tf.constant(list(special.values()))

    def __call__(self, texts: tf.Tensor) -> tf.Tensor:
        return self.frame(self.clean(texts))

    def frame(self, cleaned: tf.Tensor) -> tf.Tensor:
        return tf.strings.join([self.before, cleaned, self.after])

    def clean(self, texts: tf.Tensor) -> tf.Tensor:
        """The text prep without the framing: TEXT_PREPS[text_prep][0] of each text."""
        texts = tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace",
                                             replacement_char=REPLACEMENT_CHARACTER)
        texts = self.unescape(texts)
        space = whitespace()
        if self.text_prep == "project":  # records.clean
            texts = tf.strings.regex_replace(texts, TAG, " ")
            texts = tf.strings.regex_replace(texts, space + "+", " ")
            return tf.strings.regex_replace(texts, r"\A | \z", "")  # strip: only single spaces are left
        texts = tf.strings.regex_replace(texts, "\n", " ", replace_global=True)  # radford_prep
        return tf.strings.regex_replace(texts, rf"\A{space}+|{space}+\z", "")

    def unescape(self, texts: tf.Tensor) -> tf.Tensor:
        """html.unescape: each character reference cut out between marks, replaced, and the pieces joined."""
        pieces = tf.strings.split(tf.strings.regex_replace(texts, CHARREF, MARK + rb"\0" + MARK), sep=MARK)
        # Each row alternates text, reference, text, ..., text: the references are the odd pieces.
        odd = tf.ragged.range(pieces.row_lengths()).flat_values % 2 == 1
        where = tf.where(odd)
        flat = tf.tensor_scatter_nd_update(pieces.flat_values, where,
                                           self.replace(tf.gather_nd(pieces.flat_values, where)))
        return tf.strings.reduce_join(pieces.with_flat_values(flat), axis=1)

    def replace(self, references: tf.Tensor) -> tf.Tensor:
        """html._replace_charref of each reference ("&#65;", "&amp", "&notit;", ...)."""
        numeric = tf.strings.substr(references, 1, 1) == "#"
        return tf.where(numeric, self._numeric(references), self._named(references))

    def _numeric(self, references: tf.Tensor) -> tf.Tensor:
        """&#N; and &#xH;: the invalid-charref table, then U+FFFD out of range, "" for invalid code points, chr."""
        hexadecimal = tf.strings.regex_full_match(references, "&#[xX].*")
        digits = tf.strings.regex_replace(references, r"\A&#[xX]?0*|;\z", "")
        # Without leading zeros, more digits than 0x10FFFF has is a larger number: Python's int() has no
        # limit, int64 has, so such a number is out of range before it is converted. The rest are read as
        # DIGITS digits, zero-padded on the left.
        too_long = tf.strings.length(digits) > tf.where(hexadecimal, HEX_DIGITS, DIGITS)
        padded = tf.strings.substr(tf.strings.join(["0" * DIGITS, tf.where(too_long, "", digits)]), -DIGITS, DIGITS)
        values = _digit_value(tf.cast(tf.io.decode_raw(padded, tf.uint8, fixed_length=DIGITS), tf.int64))
        base = tf.where(hexadecimal, tf.constant(16, tf.int64), tf.constant(10, tf.int64))[:, None]
        number = tf.reduce_sum(values * tf.pow(base, tf.range(DIGITS - 1, -1, -1, dtype=tf.int64)), axis=1)
        out_of_range = too_long | (number > LARGEST_CODE_POINT) | ((number >= SURROGATES[0])
                                                                  & (number <= SURROGATES[1]))
        special = self.special_numbers.lookup(number)
        printable = tf.where(out_of_range | (special >= 0), tf.constant(ord(" "), tf.int64), number)
        plain = tf.strings.unicode_encode(tf.cast(printable, tf.int32)[:, None], "UTF-8")
        return tf.where(special >= 0, tf.gather(self.special_values, tf.maximum(special, 0)),
                        tf.where(out_of_range, chr(REPLACEMENT_CHARACTER), plain))

    def _named(self, references: tf.Tensor) -> tf.Tensor:
        """The name if it is an entity, else its longest entity prefix (of 2 or more characters, not the
        whole name) followed by the rest, else the reference unchanged."""
        name = tf.strings.regex_replace(references, r"\A&", "")
        whole = self.entity_names.lookup(name)
        characters = tf.strings.length(name, unit="UTF8_CHAR")
        prefix, prefix_length = tf.fill(tf.shape(name), tf.constant(-1, tf.int64)), tf.zeros_like(characters)
        for length in self.prefix_lengths:  # ascending: the longest hit is kept
            found = self.entity_names.lookup(tf.strings.substr(name, 0, length, unit="UTF8_CHAR"))
            hit = (found >= 0) & (length < characters)  # a shorter name's substr is the whole name, no prefix
            prefix, prefix_length = tf.where(hit, found, prefix), tf.where(hit, length, prefix_length)
        rest = tf.strings.substr(name, prefix_length, characters - prefix_length, unit="UTF8_CHAR")
        by_prefix = tf.strings.join([tf.gather(self.entity_values, tf.maximum(prefix, 0)), rest])
        return tf.where(whole >= 0, tf.gather(self.entity_values, tf.maximum(whole, 0)),
                        tf.where(prefix >= 0, by_prefix, references))


def _digit_value(codes: tf.Tensor) -> tf.Tensor:
    """The value of each ASCII digit 0-9, a-f, A-F."""
    lower = tf.bitwise.bitwise_or(codes, 0x20)  # A-F -> a-f
    return tf.where(codes <= ord("9"), codes - ord("0"), lower - ord("a") + 10)


class _Reader:
    """Framed texts -> the readout the classifier was fitted on: inference.read_texts, the featuriser's
    own graph, with TensorFlow's gate math. A plain object, not a tf.Module: the SavedModel keeps the
    model's variables, not the Keras model.
    """

    def __init__(self, model: LanguageModel, readout: str, batch_size: int, chunk: int):
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {list(READOUTS)}, got {readout!r}")
        if batch_size < 1 or chunk < 1:
            raise ValueError(f"batch size and chunk must be at least 1, got {batch_size} and {chunk}")
        self.model, self.readout, self.batch_size, self.chunk = model, readout, batch_size, chunk

    def __call__(self, data: tf.Tensor) -> tf.Tensor:
        """[N] framed texts (none empty) -> [N, readout_width] float32, in input order."""
        lengths = tf.strings.length(data)
        flat = tf.io.decode_raw(tf.strings.reduce_join(data), tf.uint8)
        *states, _ = read_texts(self.model, flat, lengths, self.batch_size, self.chunk, fused=False)
        return readout_values([self.readout], lengths, *states)[self.readout]


class ServingModel(tf.Module):
    """Raw texts -> the classifier's probabilities, every step a graph op: what export saves.

    `classify(texts: string [N])` returns `probabilities` float32 [N, classes], columns in the order of
    `labels` (a string variable), and `label` string [N], the most probable class. A text that is empty
    after its prep has nothing to classify (classify leaves it unlabelled): its probabilities are NaN
    and its label "".
    """

    def __init__(self, model: LanguageModel, classifier: Classifier, batch_size: int = 32, chunk: int = 256):
        super().__init__(name="classifier")
        settings = classifier.featurization
        self.prep = TextPrep(settings["text_prep"])
        self.labels = tf.Variable(classifier.labels, trainable=False, name="labels")
        self.model_weights = model.embed.weights + model.rnn.weights  # what the graph reads, saved with it
        self._read = _Reader(model, settings["readout"], batch_size, chunk)
        # The classifier in float64, as Classifier.predict_proba computes it with NumPy.
        self._mean, self._scale = tf.constant(classifier.mean, tf.float64), tf.constant(classifier.scale, tf.float64)
        self._coef = tf.constant(classifier.coef, tf.float64)
        self._intercept = tf.constant(classifier.intercept, tf.float64)
        self._binary = len(classifier.labels) == 2

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="texts")])
    def classify(self, texts):
        cleaned = self.prep.clean(texts)
        kept = tf.where(tf.strings.length(cleaned) > 0)
        features = self._read(self.prep.frame(tf.gather_nd(cleaned, kept)))
        probabilities = self.probabilities(features)
        count, classes = tf.size(texts), tf.size(self.labels)
        return {"probabilities": tf.tensor_scatter_nd_update(tf.fill([count, classes], np.nan), kept,
                                                             tf.cast(probabilities, tf.float32)),
                "label": tf.tensor_scatter_nd_update(tf.fill([count], ""), kept,
                                                     tf.gather(self.labels, tf.argmax(probabilities, axis=1)))}

    def probabilities(self, features: tf.Tensor) -> tf.Tensor:
        """Classifier.predict_proba: [K, classes] float64."""
        standardised = (tf.cast(features, tf.float64) - self._mean) / self._scale
        scores = standardised @ tf.transpose(self._coef) + self._intercept
        if self._binary:  # one row of coefficients: the second label's log-odds
            p = tf.sigmoid(scores[:, 0])
            return tf.stack([1 - p, p], axis=1)
        return tf.nn.softmax(scores, axis=1)
