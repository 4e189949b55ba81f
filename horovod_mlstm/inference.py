"""The one featuriser shared by transfer, classify and the transfer suite (and the loader evaluate,
generate and visualize call): texts -> one feature vector each, read by a trained model.

Texts stream through in windows of `window` texts: each window is sorted by length and cut into
batches, so a batch pads little, and its features come back in input order. Memory is bounded by
the window (its texts and their features), not by how many texts there are.
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
WINDOW_BATCHES = 16  # texts sorted by length together: this many batches' worth


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

    Within a window texts are sorted by length and batched. A batch goes through in `chunk`-byte
    pieces with the state carried, so memory stays bounded whatever the text length; a row leaves
    the batch after its last piece, and within a piece a mask keeps each row's state fixed after its
    last byte and keeps padding out of the mean and max.
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
        n = self.model.config.hidden_size
        state = [tf.TensorSpec([None, None], tf.int32)] + [tf.TensorSpec([None, n], tf.float32)] * 4
        self._step_masked = tf.function(self._read, input_signature=state + [tf.TensorSpec([None, None], tf.bool)])
        self._step = tf.function(self._read, input_signature=state)  # every byte of the piece is real

    @property
    def settings(self) -> dict:
        """The choices that change the features (batch size and chunk do not)."""
        return {"text_prep": self.text_prep, "readout": self.readout}

    def identity(self) -> dict:
        return modeldir.identity(self.model_dir, self.checkpoint)

    def _read(self, x, h, c, total, peak, mask=None):
        """One piece: the carried state, and the running sum and max of hidden states over real bytes."""
        hs, (h, c) = self.model.rnn(self.model.embed(x), (h, c), mask=mask, forward_only=True)
        hs = tf.cast(hs, tf.float32)
        if mask is None:
            return h, c, total + tf.reduce_sum(hs, axis=1), tf.maximum(peak, tf.reduce_max(hs, axis=1))
        real = mask[:, :, None]
        total += tf.reduce_sum(tf.where(real, hs, 0.0), axis=1)
        peak = tf.maximum(peak, tf.reduce_max(tf.where(real, hs, -np.inf), axis=1))
        return h, c, total, peak

    def _batch(self, encoded: list[bytes]) -> dict[str, np.ndarray]:
        """Every readout of one batch of encoded texts, in their order.

        A row leaves the batch at the first piece after its last byte (rows sorted by length, so the
        ended ones are a prefix): a short text costs no whole pieces of padding beside a long one, and a
        piece where every remaining row is real runs without the mask's per-step selects.
        """
        order = np.argsort([len(e) for e in encoded], kind="stable")
        lengths = np.array([len(encoded[i]) for i in order])
        flat = np.frombuffer(b"".join(encoded[i] for i in order), np.uint8)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        n = self.model.config.hidden_size
        out = {r: np.empty([len(encoded), readout_width(r, n)], np.float32) for r in READOUTS}
        h, c = self.model.zero_state(len(encoded))
        total, peak = tf.zeros([len(encoded), n]), tf.fill([len(encoded), n], -np.inf)
        first = 0  # rows [0, first) of the sorted batch have ended and left it
        for t in range(0, lengths[-1], self.chunk):
            ended = int(np.searchsorted(lengths, t, side="right"))
            if ended > first:
                k = ended - first
                _store(out, order[first:ended], lengths[first:ended], h[:k], c[:k], total[:k], peak[:k])
                h, c, total, peak, first = h[k:], c[k:], total[k:], peak[k:], ended
            live = lengths[first:]
            positions = np.arange(t, min(t + self.chunk, live[-1]))
            mask = positions[None, :] < live[:, None]
            x = np.where(mask, flat[np.where(mask, starts[first:, None] + positions[None, :], 0)], 0).astype(np.int32)
            if mask.all():
                h, c, total, peak = self._step(x, h, c, total, peak)
            else:
                h, c, total, peak = self._step_masked(x, h, c, total, peak, mask)
        _store(out, order[first:], lengths[first:], h, c, total, peak)
        return out

    def stream(self, texts: Iterable[str], readouts: Collection[str] = READOUTS,
               progress: Callable[[int], None] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """{readout: [texts in the window, readout_width] float32} for each window of texts, in input order.

        `progress(n)` is called after each batch of n texts.
        """
        for window in windows(texts, self.window):
            encoded = [encode(t, self.text_prep) for t in window]
            order = np.argsort([len(e) for e in encoded], kind="stable")
            out = {r: np.empty([len(window), readout_width(r, self.model.config.hidden_size)], np.float32)
                   for r in readouts}
            for first in range(0, len(order), self.batch_size):
                rows = order[first:first + self.batch_size]
                batch = self._batch([encoded[i] for i in rows])
                for readout in readouts:
                    out[readout][rows] = batch[readout]
                if progress:
                    progress(len(rows))
            yield out

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
    """Every readout of ended texts into OUT's ROWS."""
    out["final_cell"][rows], out["final_hidden"][rows], out["max_hidden"][rows] = c.numpy(), h.numpy(), peak.numpy()
    out["mean_hidden"][rows] = total.numpy() / lengths[:, None].astype(np.float32)
    out[CONCAT][rows] = np.concatenate([out[part][rows] for part in CONCAT_PARTS], axis=1)


def readout_width(readout: str, hidden: int) -> int:
    """Units of a readout of a model with HIDDEN units: 3 x hidden for concat_hidden, else hidden."""
    return len(CONCAT_PARTS) * hidden if readout == CONCAT else hidden
