"""The one featuriser shared by transfer, classify and the transfer suite (and the loader evaluate,
generate and visualize call): texts -> one feature vector each, read by a trained model.

Texts stream through in windows of `window` texts, and their features come back in input order.
Memory is bounded by the window (its texts and their features), not by how many texts there are.
Within a window the model reads `batch_size` texts at once, a text per row, in pieces of at most
`chunk` bytes with the state carried; a row whose text has ended takes the next text at the next
piece, so the batch stays full until the window runs out of texts (Featurizer.read_window).
"""

from __future__ import annotations

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
# MIN_PIECE bytes or PAD_SHARE of the shortest text in the batch: a piece call costs about six steps of
# a 512-unit model (TensorFlow's call, the input projection, the loop's start), so rows that end
# sooner pad instead. Measured at hidden 512 (docs/PERFORMANCE.md): SST sentences ran fastest with
# pieces of 8 bytes or more, IMDB reviews with 64 or more.
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


class Featurizer:
    """Texts -> one feature vector each, read by a trained model.

    A window's texts are read longest first, `batch_size` rows at a time: each row holds one text,
    read in pieces with its state carried, and takes the next text once its own has ended, its state
    zeroed. A piece runs to where the first row's text ends (at least MIN_PIECE bytes or PAD_SHARE of
    the batch's shortest text, at most `chunk`); a row whose text ends sooner reads padding that changes
    nothing (model.MLSTM.read).
    Longest first makes the batch drain on the short texts at the window's end.
    """

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
        n, rnn = self.model.config.hidden_size, self.model.rnn
        weights = [tf.TensorSpec(w.shape, rnn.compute_dtype) for w in rnn.compute_weights()]
        state = [tf.TensorSpec([None, n], tf.float32)] * 4
        self._weights = tf.function(rnn.compute_weights)
        self._piece = tf.function(self._read, input_signature=[tf.TensorSpec([None, None], tf.int32), *state,
                                                               tf.TensorSpec([None], tf.int32), *weights])

    @property
    def settings(self) -> dict:
        """The choices that change the features (batch size and chunk do not)."""
        return {"text_prep": self.text_prep, "readout": self.readout}

    def identity(self) -> dict:
        return modeldir.identity(self.model_dir, self.checkpoint)

    def _read(self, x, h, c, total, peak, lengths, *weights):
        """One piece: each row's first LENGTHS bytes of X read on from its state."""
        return self.model.rnn.read(self.model.embed(x), h, c, total, peak, lengths, weights)

    def read_window(self, encoded: list[bytes], readouts: Collection[str] = READOUTS,
                    progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """{readout: [len(encoded), readout_width]} of encoded texts (none empty), in their order; `progress(k)`
        after each piece that ends k texts."""
        lengths = np.array([len(e) for e in encoded])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        flat = np.frombuffer(b"".join(encoded), np.uint8)
        queue = iter(np.argsort(-lengths, kind="stable"))  # longest first
        n = self.model.config.hidden_size
        out = {r: np.empty([len(encoded), readout_width(r, n)], np.float32) for r in readouts}
        weights = self._weights()  # once per window: the same for every piece
        rows = min(self.batch_size, len(encoded))
        text = np.full(rows, -1)  # the text each row reads (-1: none)
        done = np.zeros(rows, np.int64)  # bytes of it read so far
        h, c, total, peak = (np.zeros([rows, n], np.float32) for _ in range(4))
        while True:
            for row in np.flatnonzero(text < 0):  # free rows take the next texts, from a zero state
                text[row] = next(queue, -1)
                done[row] = 0
                h[row], c[row], total[row], peak[row] = 0.0, 0.0, 0.0, -np.inf
            if (text < 0).any():  # no texts left to take: the batch shrinks to the rows still reading
                live = text >= 0
                text, done, h, c, total, peak = (a[live] for a in (text, done, h, c, total, peak))
                if not len(text):
                    return out
            left = lengths[text] - done
            size = int(min(self.chunk, max(left.min(), MIN_PIECE, PAD_SHARE * lengths[text].min()), left.max()))
            take = np.minimum(left, size)
            positions = np.arange(size)[None, :]
            x = np.where(positions < take[:, None],
                         flat[np.minimum(starts[text, None] + done[:, None] + positions, len(flat) - 1)], 0)
            h, c, total, peak = (np.array(a) for a in self._piece(x.astype(np.int32), h, c, total, peak,
                                                                 take.astype(np.int32), *weights))
            done += take
            ended = done == lengths[text]
            _store(out, text[ended], lengths[text[ended]], h[ended], c[ended], total[ended], peak[ended])
            text[ended] = -1
            if progress and ended.any():
                progress(int(ended.sum()))

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


def _store(out: dict[str, np.ndarray], rows: np.ndarray, lengths: np.ndarray, h, c, total, peak) -> None:
    """The readouts OUT holds of ended texts, into its ROWS."""
    values = {"final_cell": c, "final_hidden": h, "max_hidden": peak,
              "mean_hidden": total / lengths[:, None].astype(np.float32)}
    if CONCAT in out:
        values[CONCAT] = np.concatenate([values[part] for part in CONCAT_PARTS], axis=1)
    for readout, array in out.items():
        array[rows] = values[readout]


def readout_width(readout: str, hidden: int) -> int:
    """Units of a readout of a model with HIDDEN units: 3 x hidden for concat_hidden, else hidden."""
    return len(CONCAT_PARTS) * hidden if readout == CONCAT else hidden
