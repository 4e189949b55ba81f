"""Featurisation throughput against the forward matmul limit, as step.py does for training updates.

The project's one featuriser (inference.Featurizer) reads a file's texts at each shape asked for:
a batch size, a chunk length (the longest piece) and a window (batches' worth of texts read
together, longest first). Each reading reports texts/s, chars/s (the bytes the model read, padding
excluded), the share of computed positions that were padding, and the forward FLOP rate against the
chained matmul limit of the same dtype and batch (step.matmul_rate), read before and after the runs with
the faster reading kept, as step.py keeps it.

FLOPs per character are the forward pass's matmuls the featuriser runs: model.flops_per_char's
forward count without the softmax layer, which featurising never computes (counting it would lift
the efficiency by 9% at hidden 512 and 1% at 4096 for work not done).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

from horovod_mlstm import modeldir
from horovod_mlstm.bench.step import limit_readings, matmul_rate
from horovod_mlstm.inference import Featurizer, encode
from horovod_mlstm.model import PRECISIONS, VOCAB_SIZE, ModelConfig, build_model, flops_per_char, set_precision


@dataclasses.dataclass(frozen=True)
class Shape:
    """How the featuriser batches: rows per batch, bytes per piece at most, batches' worth of texts per window."""

    batch_size: int
    chunk: int
    window_batches: int


def featurising_flops_per_char(hidden: int, embed: int) -> float:
    """Matmul FLOPs per byte the featuriser reads: the forward pass without the softmax layer."""
    return flops_per_char(hidden, embed, training=False) - 2.0 * hidden * VOCAB_SIZE


def efficiency(chars_per_s: float, flops_per_char_: float, limit_flops_per_s: float) -> dict:
    """The forward FLOP rate of chars_per_s and its share of the limit."""
    rate = chars_per_s * flops_per_char_
    return {"flops_per_s": rate, "limit_flops_per_s": limit_flops_per_s, "efficiency": rate / limit_flops_per_s}


def compute_dtype(precision: str) -> str:
    """The dtype the model's matmuls run in under PRECISION (its limit's dtype)."""
    return tf.keras.mixed_precision.Policy(PRECISIONS[precision]).compute_dtype


def random_model_dir(parent: str, hidden: int, precision: str) -> str:
    """A model dir holding a randomly initialised model (untrained weights cost the same to read)."""
    model = build_model(ModelConfig(hidden_size=hidden, precision=precision))
    return modeldir.write_model(os.path.join(parent, f"random_{hidden}_{precision}"), model, step=0)


def count_positions(featurizer: Featurizer) -> list[int]:
    """Wraps the featuriser's piece step so that it adds every position it computes (real bytes and
    padding) to the returned one-item list: the padding share is then what ran, not a recount."""
    counted = [0]
    read_piece = featurizer._piece

    def read(x, *state):
        counted[0] += x.size
        return read_piece(x, *state)

    featurizer._piece = read
    return counted


def read_rate(featurizer: Featurizer, texts: list[str], repeats: int) -> dict:
    """Median, min and max seconds of featurising every text, after a warm-up on the first batch."""
    featurizer.transform(texts[:featurizer.batch_size])
    counted = count_positions(featurizer)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        featurizer.transform(texts)
        times.append(time.perf_counter() - start)
    return {"seconds": {"median": float(np.median(times)), "min": min(times), "max": max(times)},
            "positions": counted[0] // repeats}


def measure_model(model_dir: str, texts: list[str], shapes: list[Shape], repeats: int) -> tuple[list, list]:
    """(limits, runs) for one model: every shape's featurisation rate, and the chained matmul limit of
    the model's compute dtype at each batch size, read before and after the runs."""
    config = modeldir.read_config(model_dir)
    hidden, dtype = config.hidden_size, compute_dtype(config.precision)
    per_char = featurising_flops_per_char(hidden, config.embed_size)
    batches = sorted({s.batch_size for s in shapes})
    before = {b: {dtype: matmul_rate(b, hidden, tf.as_dtype(dtype), repeats)} for b in batches}
    runs = []
    for shape in shapes:
        featurizer = Featurizer(model_dir, batch_size=shape.batch_size, chunk=shape.chunk)
        featurizer.window = shape.batch_size * shape.window_batches
        chars = sum(len(encode(t, featurizer.text_prep)) for t in texts)
        timing = read_rate(featurizer, texts, repeats)
        seconds = timing["seconds"]["median"]
        runs.append({"hidden": hidden, "precision": config.precision, "dtype": dtype, **dataclasses.asdict(shape),
                     "texts": len(texts), "chars": chars, "positions": timing["positions"],
                     "padding_share": 1 - chars / timing["positions"], "seconds": timing["seconds"],
                     "texts_per_s": len(texts) / seconds, "chars_per_s": chars / seconds, "flops_per_char": per_char})
        print(f"[bench] featurise hidden {hidden} {config.precision} batch {shape.batch_size} chunk {shape.chunk} "
              f"window {shape.window_batches} batches: {runs[-1]['texts_per_s']:,.1f} texts/s, "
              f"{runs[-1]['chars_per_s']:,.0f} chars/s, padding {runs[-1]['padding_share']:.1%}", flush=True)
    set_precision("fp32")
    limits = [x for b in batches for x in limit_readings(b, hidden, before[b], repeats)]
    limit = {x["batch"]: x["flops_per_s"] for x in limits}
    for r in runs:
        r.update(efficiency(r["chars_per_s"], r["flops_per_char"], limit[r["batch_size"]]))
    return limits, runs


def measure(model_dir: str, hiddens: list[int], precisions: list[str], texts: list[str], shapes: list[Shape],
            repeats: int) -> dict:
    """Every model's limits and runs: MODEL_DIR's, or with model_dir empty a random one of each hidden
    size and precision."""
    result = {"limits": [], "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as scratch:
        dirs = [model_dir] if model_dir else (random_model_dir(scratch, h, p) for h in hiddens for p in precisions)
        for path in dirs:  # a random model is made when its turn comes and removed after it: one on disk at a time
            limits, runs = measure_model(path, texts, shapes, repeats)
            result["limits"] += limits
            result["runs"] += runs
            if not model_dir:
                shutil.rmtree(path)
    return result
