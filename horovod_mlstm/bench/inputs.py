"""The input side: bytes per second the window pipeline delivers to one rank, and megabytes per second
preprocessing writes into TFRecord shards, on the built-in corpus grammar, in this process. Training
consumes a few thousand bytes per second per rank, so these only need to be far above that.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from horovod_mlstm import corpus
from horovod_mlstm.bench.step import timed
from horovod_mlstm.data import ByteStreams
from horovod_mlstm.records import write_corpus


def input_rates(repeats: int) -> dict:
    """Window pipeline bytes/s per rank (32 streams x 256 bytes) and preprocessing MB/s."""
    texts = list(corpus.texts(4000, seed=3))
    with tempfile.TemporaryDirectory() as tmp:
        t = timed(lambda: write_corpus(texts, os.path.join(tmp, "out"), num_shards=2), repeats)
    megabytes = sum(len(s.encode()) + 1 for s in texts) / 1e6
    streams = ByteStreams(np.frombuffer(("\n".join(texts) * 4).encode(), np.uint8), rows=32, seq_length=256)
    count = min(200, streams.windows_per_epoch)
    p = timed(lambda: [None for _ in streams.dataset(0, count)], repeats)
    return {"pipeline_bytes_per_s": count * 32 * 256 / p["median"], "pipeline_seconds": p,
            "preprocess_mb_per_s": megabytes / t["median"], "preprocess_seconds": t}
