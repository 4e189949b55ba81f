"""Featurisation throughput against the forward matmul limit, as step.py does for training updates.

The project's one featuriser (inference.Featurizer) reads a file's texts at each shape asked for:
a batch size, a chunk length (the longest piece) and a window (batches' worth of texts read
together, longest first). Each reading reports texts/s, chars/s (the bytes the model read, padding
excluded), the share of computed positions that were padding, and the forward FLOP rate against the
chained matmul limit of the same dtype and batch (step.chained_matmuls), read for as long as each
pass right after it: the share is the median over passes of each pass's rate over its own reading
(efficiency). On a shared host whose speed drifts, short readings put the same featuriser at 32% to
98% of its limit in different runs.

FLOPs per character are the matmuls the featuriser runs per byte, the recurrent two: the softmax
layer is never computed and the input projection is a row looked up (counting them would lift the
efficiency by 22% at hidden 512 and 3% at 4096 for work not done).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from horovod_mlstm import modeldir
from horovod_mlstm.bench.step import chained_matmuls
from horovod_mlstm.inference import Featurizer, encode
from horovod_mlstm.model import PRECISIONS, ModelConfig, build_model, set_precision


@dataclasses.dataclass(frozen=True)
class Shape:
    """How the featuriser batches: rows per batch, bytes per piece at most, batches' worth of texts per window."""

    batch_size: int
    chunk: int
    window_batches: int


def featurising_flops_per_char(hidden: int) -> float:
    """Matmul FLOPs per byte the featuriser reads: the recurrent two, h W_mh and m W_h. The softmax layer
    is never computed, and the input projection is a row looked up (LanguageModel.byte_projections)."""
    return 2.0 * (hidden * hidden + hidden * 4 * hidden)


def efficiency(chars: int, seconds: list[float], flops_per_char_: float, limits: list[float]) -> dict:
    """The forward FLOP rate of the median pass, and its share of the limit: the median over passes of
    each pass's rate over the limit read for as long right after it, so a machine whose speed drifts
    (a shared host's neighbours) moves both sides of each share alike."""
    shares = [chars / s * flops_per_char_ / limit for s, limit in zip(seconds, limits)]
    return {"flops_per_s": chars / float(np.median(seconds)) * flops_per_char_,
            "limit_flops_per_s": float(np.median(limits)), "limit_readings": limits,
            "efficiency": float(np.median(shares))}


def compute_dtype(precision: str) -> str:
    """The dtype the model's matmuls run in under PRECISION (its limit's dtype)."""
    return tf.keras.mixed_precision.Policy(PRECISIONS[precision]).compute_dtype


def random_model_dir(parent: str, hidden: int, precision: str) -> str:
    """A model dir holding a randomly initialised model (untrained weights cost the same to read)."""
    model = build_model(ModelConfig(hidden_size=hidden, precision=precision))
    return modeldir.write_model(os.path.join(parent, f"random_{hidden}_{precision}"), model, step=0)


def limit_reader(batch: int, hidden: int, dtype) -> Callable[[float], float]:
    """read(seconds): the chained matmul limit's FLOP/s over runs that fill about SECONDS (3 at least)."""
    run, flops, _ = chained_matmuls(batch, hidden, dtype)
    run()  # traced and warmed up

    def read(seconds: float) -> float:
        runs, start = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - start < seconds:
            run()
            runs += 1
        return flops * runs / (time.perf_counter() - start)

    return read


def read_rate(featurizer: Featurizer, texts: list[str], repeats: int, limit: Callable[[float], float]) -> dict:
    """Seconds of each pass featurising every text, after a warm-up on the first batch; after each pass a
    reading of the limit as long as the pass (`limit(seconds)`, FLOP/s), so that both halves of a pair
    meet the same moment of a shared machine; and the positions computed per pass (real bytes and
    padding, as the featuriser counts them)."""
    featurizer.transform(texts[:featurizer.batch_size])
    before = featurizer.positions
    times, limits = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        featurizer.transform(texts)
        times.append(time.perf_counter() - start)
        limits.append(limit(times[-1]))
    return {"times": times, "limits": limits, "positions": (featurizer.positions - before) // repeats}


def measure_model(model_dir: str, texts: list[str], shapes: list[Shape], repeats: int) -> list[dict]:
    """Every shape's featurisation rate with one model, each pass against the chained matmul limit of the
    model's compute dtype and the shape's batch, read for as long right after it."""
    config = modeldir.read_config(model_dir)
    hidden, dtype = config.hidden_size, compute_dtype(config.precision)
    per_char = featurising_flops_per_char(hidden)
    runs = []
    for shape in shapes:
        featurizer = Featurizer(model_dir, batch_size=shape.batch_size, chunk=shape.chunk)
        featurizer.window = shape.batch_size * shape.window_batches
        chars = sum(len(encode(t, featurizer.text_prep)) for t in texts)
        timing = read_rate(featurizer, texts, repeats, limit_reader(shape.batch_size, hidden, tf.as_dtype(dtype)))
        times = timing["times"]
        seconds = float(np.median(times))
        runs.append({"hidden": hidden, "precision": config.precision, "dtype": dtype, **dataclasses.asdict(shape),
                     "texts": len(texts), "chars": chars, "positions": timing["positions"],
                     "padding_share": 1 - chars / timing["positions"],
                     "seconds": {"median": seconds, "min": min(times), "max": max(times)},
                     "texts_per_s": len(texts) / seconds, "chars_per_s": chars / seconds, "flops_per_char": per_char,
                     **efficiency(chars, times, per_char, timing["limits"])})
        r = runs[-1]
        print(f"[bench] featurise hidden {hidden} {config.precision} batch {shape.batch_size} chunk {shape.chunk} "
              f"window {shape.window_batches} batches: {r['texts_per_s']:,.1f} texts/s, {r['chars_per_s']:,.0f} "
              f"chars/s, padding {r['padding_share']:.1%}, {r['efficiency']:.0%} of the matmul limit (readings "
              f"{', '.join(f'{x / 1e9:.0f}' for x in r['limit_readings'])} GFLOP/s)", flush=True)
    set_precision("fp32")
    return runs


def measure(model_dir: str, hiddens: list[int], precisions: list[str], texts: list[str], shapes: list[Shape],
            repeats: int) -> dict:
    """Every model's runs: MODEL_DIR's, or with model_dir empty a random one of each hidden size and precision."""
    result = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as scratch:
        dirs = [model_dir] if model_dir else (random_model_dir(scratch, h, p) for h in hiddens for p in precisions)
        for path in dirs:  # a random model is made when its turn comes and removed after it: one on disk at a time
            result["runs"] += measure_model(path, texts, shapes, repeats)
            if not model_dir:
                shutil.rmtree(path)
    return result
