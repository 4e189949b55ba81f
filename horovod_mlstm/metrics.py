"""The loss and the bits-per-character metric, shared by training and evaluation."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from horovod_mlstm import distributed as dist
from horovod_mlstm.data import ByteStreams

LN2 = math.log(2.0)


def xent(targets, logits):
    """Per-byte cross-entropy in nats, float32."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)


def lm_loss(model):
    """loss(inputs, targets, h, c) -> (mean next-byte loss in nats, (h, c) after the batch): what training minimises."""
    def loss(inputs, targets, h, c):
        logits, (h, c) = model(inputs, (h, c))
        return tf.reduce_mean(xent(targets, logits)), (h, c)

    return loss


def make_eval_step(model):
    @tf.function
    def eval_step(inputs, targets, h, c):
        logits, (h, c) = model(inputs, (h, c))
        return tf.reduce_sum(xent(targets, logits)), h, c

    return eval_step


def bits_per_char(model, streams: ByteStreams, windows: int = 0, eval_step=None) -> float:
    """BPC over the first `windows` windows of every stream, summed over ranks (bpc_and_chars)."""
    return bpc_and_chars(model, streams, windows, eval_step)[0]


def bpc_and_chars(model, streams: ByteStreams, windows: int = 0, eval_step=None) -> tuple[float, int]:
    """(BPC, characters scored) over the first `windows` windows of every stream, summed over ranks.

    The state starts at zero and carries across windows, as in training. windows=0 is one full
    pass, including the short tail after the last full window, so that every byte of every
    stream but its first is scored.
    """
    eval_step = eval_step or make_eval_step(model)
    count = min(windows or streams.windows_per_epoch, streams.windows_per_epoch)
    h, c = model.zero_state(streams.rows)
    nats, chars = 0.0, 0.0
    for batch in streams.dataset(0, count):
        loss_sum, h, c = eval_step(batch["inputs"], batch["targets"], h, c)
        nats += float(loss_sum)
        chars += float(np.prod(batch["inputs"].shape))
    tail = streams.tail() if not windows else None
    if tail is not None:
        loss_sum, h, c = eval_step(tf.constant(tail[0]), tf.constant(tail[1]), h, c)
        nats += float(loss_sum)
        chars += float(tail[0].size)
    chars = dist.total(chars)
    return float(dist.total(nats) / chars / LN2), int(chars)
