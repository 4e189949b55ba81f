"""The one featuriser shared by transfer, classify and the transfer suite (and the loader evaluate,
generate and visualize call): texts -> one feature vector each, read by a trained model.

Texts stream through in windows of `window` texts, and their features come back in input order.
Memory is bounded by the window (its texts and their features), not by how many texts there are.
A window is one call of read_texts, a graph that reads `batch_size` texts at once, a text per row,
in pieces of at most `chunk` bytes with the state carried; a row whose text has ended takes the next
text at the next piece, so the batch stays full until the window runs out of texts. The exported
classifier (serving.py) reads with the same graph.
"""

from __future__ import annotations

import functools
import html
import itertools
from collections.abc import Callable, Collection, Iterable, Iterator

import numpy as np
import tensorflow as tf
from absl import flags

from horovod_mlstm import modeldir
from horovod_mlstm.model import LanguageModel
from horovod_mlstm.records import DOC_END, clean

READOUTS = ("final_cell", "final_hidden", "mean_hidden", "max_hidden", "concat_hidden")
CONCAT = "concat_hidden"  # the three hidden-state readouts side by side, [texts, 3 x hidden]
CONCAT_PARTS = ("final_hidden", "mean_hidden", "max_hidden")  # its parts, in its order
AUTO = "auto"  # transfer: every readout, the one best on validation kept
WINDOW_BATCHES = 16  # texts read as one window: this many batches' worth
# A piece ends where the first of its rows' texts ends, so no row pads, unless that is sooner than
# MIN_PIECE bytes or PAD_SHARE of the shortest text in the batch: a piece costs more than a step (the
# inner loop's start, the lookups, the refill), so rows that end sooner pad instead.
MIN_PIECE = 8
PAD_SHARE = 1 / 16


def load_trained_model(model_dir: str) -> LanguageModel:
    """The model MODEL_DIR holds (config.json, with its precision), restored from its newest readable checkpoint."""
    return modeldir.load(model_dir)[0]


def project_prep(text: str) -> str:
    """The project's text prep: cleaned as preprocess cleans training documents."""
    return clean(text)


def radford_prep(text: str) -> str:
    """OpenAI's released encoder (generating-reviews-discovering-sentiment, utils.preprocess)."""
    return html.unescape(text).replace("\n", " ").strip()


# name -> (prep, framing before, framing after): the bytes the model reads are before + prep(text) + after.
TEXT_PREPS = {
    "project": (project_prep, DOC_END.decode(), ""),  # as training saw a document: after a document end
    "radford": (radford_prep, "\n ", " "),
}


def encode(text: str, text_prep: str = "project") -> bytes:
    """The UTF-8 bytes the model reads for a text."""
    prep, before, after = TEXT_PREPS[text_prep]
    return (before + prep(text) + after).encode("utf-8", errors="replace")


def is_empty(text: str, text_prep: str = "project") -> bool:
    """Nothing is left of the text after its prep (the model would read only the framing)."""
    return not TEXT_PREPS[text_prep][0](text)


def define_featurizer_flags(fitting: bool) -> None:
    """--text_prep and --readout. Fitting (transfer) has defaults and --readout auto; classify has neither:
    its featurisation comes from the classifier file."""
    flags.DEFINE_enum("text_prep", "project" if fitting else None, list(TEXT_PREPS),
                      "project: cleaned like training documents, after a document end; radford: OpenAI's "
                      "encoder (HTML-unescaped, newlines to spaces, stripped, framed as '\\n ' + text + ' ').")
    flags.DEFINE_enum("readout", AUTO if fitting else None, [*READOUTS, AUTO] if fitting else list(READOUTS),
                      "Feature of a text: the final cell or hidden state, the mean or max of the hidden "
                      "states over its bytes, or concat_hidden: final, mean and max hidden side by side (3 x "
                      "hidden units)" + ("; auto: each of them fitted, the one with the best validation "
                                         "accuracy kept." if fitting else "."))


def windows(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of SIZE items (the last may be shorter)."""
    items = iter(items)
    while window := list(itertools.islice(items, size)):
        yield window


def read_texts(model: LanguageModel, flat: tf.Tensor, lengths: tf.Tensor, batch_size: int, chunk: int,
               fused: bool | None = None, report: Callable[[tf.Tensor], None] | None = None) -> tuple:
    """Every text read by MODEL, in graph ops: (h, c, total, peak) [texts, hidden] float32 after each
    text's last byte, in input order, and the positions computed (padding included).

    FLAT [bytes] uint8 holds the texts back to back, LENGTHS [texts] (none 0) their sizes. They are read
    longest first, BATCH_SIZE rows at a time, in pieces with the state carried: a row takes the next
    text once its own has ended, its state zeroed, so the batch stays full until no text is left. A
    piece runs to where the first row's text ends (at least MIN_PIECE bytes or PAD_SHARE of the
    batch's shortest text, at most CHUNK); a row whose text ends sooner reads padding that changes
    nothing (MLSTM.read). The whole schedule runs in the graph: one call for any number of texts, no
    return to Python between pieces. REPORT(k): called (as a tf.py_function) after each piece, k the
    texts it ended. fused: as MLSTM's; a graph to be saved passes False.
    """
    n = model.config.hidden_size
    w_in, wh, wmh = model.rnn.compute_weights()
    table = model.byte_projections(w_in)
    lengths = tf.cast(lengths, tf.int32)
    starts = tf.cumsum(lengths, exclusive=True)
    order = tf.argsort(-lengths, stable=True)  # longest first: the batch drains on the short texts
    last = tf.maximum(tf.size(flat) - 1, 0)
    rows = tf.minimum(batch_size, tf.size(order))
    text, taken, done = order[:rows], rows, tf.zeros([rows], tf.int32)  # each row's text, bytes read of it
    h = c = total = tf.zeros([rows, n])
    peak = tf.fill([rows, n], -np.inf)
    ended_arrays = [tf.TensorArray(tf.int32, 0, dynamic_size=True, infer_shape=False, element_shape=[None])] + [
        tf.TensorArray(tf.float32, 0, dynamic_size=True, infer_shape=False, element_shape=[None, n])] * 4
    pieces, positions = 0, tf.constant(0, tf.int64)
    while tf.size(text) > 0:
        tf.autograph.experimental.set_loop_options(shape_invariants=[
            (v, tf.TensorShape([None] * len(v.shape))) for v in (text, done, h, c, total, peak)])
        text_lengths = tf.gather(lengths, text)
        left = text_lengths - done
        share = tf.cast(PAD_SHARE * tf.cast(tf.reduce_min(text_lengths), tf.float32), tf.int32)
        size = tf.minimum(tf.minimum(chunk, tf.maximum(tf.maximum(tf.reduce_min(left), MIN_PIECE), share)),
                          tf.reduce_max(left))
        take = tf.minimum(left, size)
        steps = tf.range(size)
        at = tf.minimum(tf.gather(starts, text)[None, :] + done[None, :] + steps[:, None], last)  # [time, batch]
        x = tf.where(steps[:, None] < take[None, :], tf.cast(tf.gather(flat, at), tf.int32), 0)
        h, c, total, peak = model.rnn.read(table, x, h, c, total, peak, take, wh, wmh, fused)
        positions += tf.cast(tf.size(x), tf.int64)
        done += take
        ended = done == text_lengths
        ended_arrays = [a.write(pieces, tf.boolean_mask(v, ended)) for a, v in
                        zip(ended_arrays, (text, h, c, total, peak))]
        pieces += 1
        if report is not None:
            tf.py_function(report, [tf.math.count_nonzero(ended)], [])
        free = tf.where(ended)  # these rows take the next texts, from a zero state
        nxt = order[taken:taken + tf.size(free)]
        taken += tf.size(nxt)
        text = tf.tensor_scatter_nd_update(text, free, tf.pad(nxt, [[0, tf.size(free) - tf.size(nxt)]],
                                                               constant_values=-1))
        done = tf.where(ended, 0, done)
        h, c, total = (tf.where(ended[:, None], 0.0, v) for v in (h, c, total))
        peak = tf.where(ended[:, None], -np.inf, peak)
        live = text >= 0  # no texts left to take: the batch shrinks to the rows still reading
        text, done, h, c, total, peak = (tf.boolean_mask(v, live) for v in (text, done, h, c, total, peak))
    ids, *states = (a.concat() for a in ended_arrays)
    back = tf.math.invert_permutation(ids)
    return (*(tf.gather(v, back) for v in states), positions)


def readout_values(readouts: Collection[str], lengths: tf.Tensor, h, c, total, peak) -> dict[str, tf.Tensor]:
    """{readout: [texts, readout_width]} from read_texts' states of texts of LENGTHS bytes."""
    values = {"final_cell": c, "final_hidden": h, "max_hidden": peak,
              "mean_hidden": total / tf.cast(lengths, tf.float32)[:, None]}
    if CONCAT in readouts:
        values[CONCAT] = tf.concat([values[part] for part in CONCAT_PARTS], axis=1)
    return {readout: values[readout] for readout in readouts}


class Featurizer:
    """Texts -> one feature vector each, read by a trained model (read_texts, one call per window)."""

    def __init__(self, model_dir: str, text_prep: str = "project", readout: str = "final_cell",
                 batch_size: int = 64, chunk: int = 256, model: LanguageModel | None = None):
        """MODEL: a model already in memory, read with its weights as they are at each call (fine-tuning
        validates the model it trains); MODEL_DIR then only names it and `identity` is not defined."""
        if text_prep not in TEXT_PREPS:
            raise ValueError(f"text_prep must be one of {list(TEXT_PREPS)}, got {text_prep!r}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {list(READOUTS)}, got {readout!r}")
        if batch_size < 1 or chunk < 1:
            raise ValueError(f"batch size and chunk must be at least 1, got {batch_size} and {chunk}")
        self.model_dir, self.text_prep, self.readout = model_dir, text_prep, readout
        self.batch_size, self.chunk = batch_size, chunk
        self.window = batch_size * WINDOW_BATCHES
        self.model, self.checkpoint = (model, None) if model is not None else modeldir.load(model_dir)
        self.positions = 0  # computed so far, padding included (the benchmark's padding share)
        self._progress: Callable[[int], None] | None = None
        self._read = tf.function(
            functools.partial(read_texts, self.model, batch_size=batch_size, chunk=chunk, report=self._report),
            input_signature=[tf.TensorSpec([None], tf.uint8), tf.TensorSpec([None], tf.int32)])

    @property
    def settings(self) -> dict:
        """The choices that change the features (batch size and chunk do not)."""
        return {"text_prep": self.text_prep, "readout": self.readout}

    def identity(self) -> dict:
        return modeldir.identity(self.model_dir, self.checkpoint)

    def _report(self, ended: tf.Tensor) -> None:
        if self._progress and int(ended):
            self._progress(int(ended))

    def read_window(self, encoded: list[bytes], readouts: Collection[str] = READOUTS,
                    progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """{readout: [len(encoded), readout_width]} of encoded texts (none empty), in their order; `progress(k)`
        after each piece that ends k texts."""
        lengths = np.array([len(e) for e in encoded], np.int32)
        self._progress = progress
        try:
            *states, positions = self._read(np.frombuffer(b"".join(encoded), np.uint8), lengths)
        finally:
            self._progress = None
        self.positions += int(positions)
        return {r: v.numpy() for r, v in readout_values(readouts, lengths, *states).items()}

    def stream(self, texts: Iterable[str], readouts: Collection[str] = READOUTS,
               progress: Callable[[int], None] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """{readout: [texts in the window, readout_width] float32} for each window of texts, in input order.

        `progress(k)` is called as each k texts are read.
        """
        for window in windows(texts, self.window):
            yield self.read_window([encode(t, self.text_prep) for t in window], readouts, progress)

    def transform_all(self, texts: Collection[str], progress: Callable[[int], None] | None = None,
                      readouts: Collection[str] = READOUTS) -> dict[str, np.ndarray]:
        """{readout: [len(texts), readout_width] float32} for the given readouts (every one by default), from one
        pass over TEXTS (any collection that can be iterated, e.g. a list or a file's column)."""
        out = {r: np.empty([len(texts), readout_width(r, self.model.config.hidden_size)], np.float32)
               for r in readouts}
        done = 0
        for part in self.stream(texts, readouts, progress):
            size = len(next(iter(part.values())))
            for readout in readouts:
                out[readout][done:done + size] = part[readout]
            done += size
        if done != len(texts):
            raise ValueError(f"read {done} texts, expected {len(texts)} (did the input change while it was read?)")
        return out

    def transform(self, texts: Collection[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """[len(texts), readout_width] float32 features of this featuriser's readout."""
        return self.transform_all(texts, progress, (self.readout,))[self.readout]


def readout_width(readout: str, hidden: int) -> int:
    """Units of a readout of a model with HIDDEN units: 3 x hidden for concat_hidden, else hidden."""
    return len(CONCAT_PARTS) * hidden if readout == CONCAT else hidden
