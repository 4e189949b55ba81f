"""The one loader and the one featuriser shared by evaluate, generate and transfer."""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from horovod_mlstm.checkpoint import latest_readable
from horovod_mlstm.records import DOC_END, clean
from horovod_mlstm.model import LanguageModel, ModelConfig, build_model


def load_trained_model(model_dir: str) -> LanguageModel:
    """Rebuilds the model from MODEL_DIR/config.json (with its precision) and restores its weights."""
    model = build_model(ModelConfig.load(model_dir))
    latest_readable(model_dir, model=model)
    return model


def encode(text: str) -> bytes:
    """A text as the model saw documents in training: after a document end, cleaned, UTF-8."""
    return DOC_END + clean(text).encode("utf-8")


def final_states(model: LanguageModel, texts: list[str], batch_size: int = 64, chunk: int = 256,
                 progress=None) -> tuple[np.ndarray, float]:
    """Cell state after reading each text: [len(texts), hidden] float32, and texts per second.

    Texts are sorted by length and batched, so a batch pads little; a mask keeps each row's
    state fixed after its last byte. Long batches go through in `chunk`-byte pieces with the
    state carried, so memory stays bounded whatever the text length.
    """
    step = tf.function(lambda x, h, c, m: model(x, (h, c), mask=m)[1],
                       input_signature=[tf.TensorSpec([None, None], tf.int32),
                                        tf.TensorSpec([None, model.config.hidden_size], tf.float32),
                                        tf.TensorSpec([None, model.config.hidden_size], tf.float32),
                                        tf.TensorSpec([None, None], tf.bool)])
    encoded = [np.frombuffer(encode(t), np.uint8) for t in texts]
    order = np.argsort([len(e) for e in encoded], kind="stable")
    out = np.zeros([len(texts), model.config.hidden_size], np.float32)
    start = time.time()
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        longest = max(len(encoded[i]) for i in rows)
        padded = np.zeros([len(rows), longest], np.int32)
        mask = np.zeros([len(rows), longest], bool)
        for r, i in enumerate(rows):
            padded[r, :len(encoded[i])] = encoded[i]
            mask[r, :len(encoded[i])] = True
        h, c = model.zero_state(len(rows))
        for t in range(0, longest, chunk):
            h, c = step(padded[:, t:t + chunk], h, c, mask[:, t:t + chunk])
        out[rows] = c.numpy()
        if progress:
            progress(len(rows))
    return out, len(texts) / max(time.time() - start, 1e-9)
