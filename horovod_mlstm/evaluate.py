"""Bits per character of a model over windows of contiguous byte streams, and its CLI.

    python -m horovod_mlstm.evaluate --model_dir M --data_dir D --split test [--output F.json]
    horovodrun -np 2 -H localhost:2 python -m horovod_mlstm.evaluate ...   # ranks split the work
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from horovod_mlstm import data, distributed as dist
from horovod_mlstm.checkpoint import CheckpointError
from horovod_mlstm.flags import BUILTIN_DATA_DIR, define_common
from horovod_mlstm.inference import load_trained_model

LN2 = math.log(2.0)


def xent(targets, logits):
    """Per-byte cross-entropy in nats, float32."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)


def make_eval_step(model):
    @tf.function
    def eval_step(inputs, targets, h, c):
        logits, (h, c) = model(inputs, (h, c))
        return tf.reduce_sum(xent(targets, logits)), h, c

    return eval_step


def bits_per_char(model, streams: data.ByteStreams, windows: int = 0, eval_step=None) -> float:
    """BPC over the first `windows` windows of every stream, summed over ranks.

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
    return float(dist.total(nats) / dist.total(chars) / LN2)


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    dist.init(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    data_dir = FLAGS.data_dir or BUILTIN_DATA_DIR
    try:
        model = load_trained_model(FLAGS.model_dir)
        streams = data.rank_streams(data_dir, FLAGS.split, FLAGS.batch_size_per_worker, FLAGS.seq_length,
                                    dist.rank(), dist.size())
    except (CheckpointError, data.DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    start = time.time()
    bpc = bits_per_char(model, streams)
    scored = int(dist.total(streams.rows * (streams.stream_length - 1)))
    total = int(dist.total(streams.data.size))
    result = {"model_dir": FLAGS.model_dir, "data_dir": data_dir, "split": FLAGS.split, "bpc": bpc,
              "bytes_scored": scored, "bytes_in_split": total, "ranks": dist.size(),
              "seconds": time.time() - start}
    if dist.is_chief():
        output = FLAGS.output or os.path.join(FLAGS.model_dir, f"eval_{FLAGS.split}.json")
        with open(output, "w") as f:
            json.dump(result, f, indent=2)
        print(f"[evaluate] {FLAGS.split}: {bpc:.4f} bits per character over {scored:,} of {total:,} bytes "
              f"({dist.size()} rank(s)); written to {output}", flush=True)


if __name__ == "__main__":
    define_common()
    flags.DEFINE_enum("split", "test", list(data.SPLITS), "Which split to score.")
    flags.DEFINE_string("output", "", "JSON file for the result; default MODEL_DIR/eval_<split>.json.")
    app.run(main)
