"""The one loader and the one featuriser shared by evaluate, generate, transfer and classify."""

from __future__ import annotations

import hashlib
import html
import os

import numpy as np
import tensorflow as tf
from absl import flags

from horovod_mlstm.checkpoint import latest_readable
from horovod_mlstm.model import LanguageModel, ModelConfig, build_model
from horovod_mlstm.records import DOC_END, clean

READOUTS = ("final_cell", "final_hidden", "mean_hidden", "max_hidden")
CHECKPOINT_KEYS = ("checkpoint", "index_sha256", "config_sha256")  # what names the weights, wherever they are


def _restore(model_dir: str) -> tuple[LanguageModel, str]:
    model = build_model(ModelConfig.load(model_dir))
    return model, latest_readable(model_dir, model=model)


def load_trained_model(model_dir: str) -> LanguageModel:
    """Rebuilds the model from MODEL_DIR/config.json (with its precision) and restores its weights."""
    return _restore(model_dir)[0]


def file_sha256(path: str) -> str:
    """The SHA-256 of a file, hex: what names checkpoints, inputs and caches."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_identity(model_dir: str, checkpoint: str) -> dict:
    """What features depend on: the checkpoint's name and hashes of its .index and of config.json.

    The .index file lists every variable's shape and the checksum of its saved bytes, so its
    hash changes with any weight; hashing it is cheap even for a 4096-unit model.
    """
    return {"model_dir": os.path.abspath(model_dir), "checkpoint": os.path.basename(checkpoint),
            "index_sha256": file_sha256(checkpoint + ".index"),
            "config_sha256": file_sha256(os.path.join(model_dir, "config.json"))}


def same_checkpoint(a: dict, b: dict) -> bool:
    """Two identities name the same weights (wherever the model dir has been moved to)."""
    return all(a.get(k) == b.get(k) for k in CHECKPOINT_KEYS)


def describe_checkpoint(identity: dict) -> str:
    return f"{identity.get('model_dir')} ({identity.get('checkpoint')}, index {str(identity.get('index_sha256'))[:12]})"


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


def define_featurizer_flags(defaults: bool) -> None:
    """--text_prep and --readout; without defaults (classify) they come from the classifier file."""
    flags.DEFINE_enum("text_prep", "project" if defaults else None, list(TEXT_PREPS),
                      "project: cleaned like training documents, after a document end; radford: OpenAI's "
                      "encoder (HTML-unescaped, newlines to spaces, stripped, framed as '\\n ' + text + ' ').")
    flags.DEFINE_enum("readout", "final_cell" if defaults else None, list(READOUTS),
                      "Feature of a text: the final cell or hidden state, or the mean or max of the hidden "
                      "states over its bytes.")


class Featurizer:
    """Texts -> one feature vector each, read by a trained model.

    Texts are sorted by length and batched, so a batch pads little; a mask keeps each row's
    state fixed after its last byte and keeps padding out of the mean and max. Long batches go
    through in `chunk`-byte pieces with the state carried, so memory stays bounded whatever the
    text length.
    """

    def __init__(self, model_dir: str, text_prep: str = "project", readout: str = "final_cell",
                 batch_size: int = 64, chunk: int = 256):
        if text_prep not in TEXT_PREPS:
            raise ValueError(f"text_prep must be one of {list(TEXT_PREPS)}, got {text_prep!r}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {list(READOUTS)}, got {readout!r}")
        if batch_size < 1 or chunk < 1:
            raise ValueError(f"batch size and chunk must be at least 1, got {batch_size} and {chunk}")
        self.model_dir, self.text_prep, self.readout = model_dir, text_prep, readout
        self.batch_size, self.chunk = batch_size, chunk
        self.model, self.checkpoint = _restore(model_dir)
        n = self.model.config.hidden_size
        self._step = tf.function(self._read, input_signature=[
            tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, n], tf.float32),
            tf.TensorSpec([None, n], tf.float32), tf.TensorSpec([None, None], tf.bool),
            tf.TensorSpec([None, n], tf.float32), tf.TensorSpec([None, n], tf.float32)])

    @property
    def settings(self) -> dict:
        """The choices that change the features (batch size and chunk do not)."""
        return {"text_prep": self.text_prep, "readout": self.readout}

    def identity(self) -> dict:
        return checkpoint_identity(self.model_dir, self.checkpoint)

    def _read(self, x, h, c, mask, total, peak):
        """One chunk: the carried state, and the running sum and max of hidden states over real bytes."""
        hs, (h, c) = self.model.rnn(self.model.embed(x), (h, c), mask=mask)
        hs = tf.cast(hs, tf.float32)
        real = mask[:, :, None]
        total += tf.reduce_sum(tf.where(real, hs, 0.0), axis=1)
        peak = tf.maximum(peak, tf.reduce_max(tf.where(real, hs, -np.inf), axis=1))
        return h, c, total, peak

    def transform(self, texts: list[str], progress=None) -> np.ndarray:
        """[len(texts), hidden] float32 features; `progress(n)` is called after each batch of n texts."""
        return self.transform_all(texts, progress)[self.readout]

    def transform_all(self, texts: list[str], progress=None) -> dict[str, np.ndarray]:
        """{readout: [len(texts), hidden] float32} for every readout, from one pass over the texts.

        Comparing readouts (or caching them) then costs one read of the texts, not four.
        """
        encoded = [np.frombuffer(encode(t, self.text_prep), np.uint8) for t in texts]
        order = np.argsort([len(e) for e in encoded], kind="stable")
        n = self.model.config.hidden_size
        out = {r: np.zeros([len(texts), n], np.float32) for r in READOUTS}
        for first in range(0, len(order), self.batch_size):
            rows = order[first:first + self.batch_size]
            lengths = np.array([len(encoded[i]) for i in rows])
            padded = np.zeros([len(rows), lengths.max()], np.int32)
            mask = np.arange(lengths.max())[None, :] < lengths[:, None]
            for r, i in enumerate(rows):
                padded[r, :lengths[r]] = encoded[i]
            h, c = self.model.zero_state(len(rows))
            total = tf.zeros([len(rows), n])
            peak = tf.fill([len(rows), n], -np.inf)
            for t in range(0, lengths.max(), self.chunk):
                h, c, total, peak = self._step(padded[:, t:t + self.chunk], h, c, mask[:, t:t + self.chunk],
                                               total, peak)
            batch = {"final_cell": c, "final_hidden": h, "mean_hidden": total / lengths[:, None].astype(np.float32),
                     "max_hidden": peak}
            for readout, values in batch.items():
                out[readout][rows] = values.numpy()
            if progress:
                progress(len(rows))
        return out
