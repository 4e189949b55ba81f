"""The paper's per-rank shape: what one update holds in memory, sends and saves, and what that means
for a rank and a job.

Each stream count runs in a fresh spawned process: build the model and Adam, run one update of
train.py's own step (update.make_update), read the peak resident size, then time a second update
and write a checkpoint. The growth in the update, against the number of streams, gives a measured
fit (bytes per stream); model.activation_bytes gives the estimate from the tensors the update keeps.
Before anything runs, every shape's estimated peak is checked against a safety limit.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import tensorflow as tf

from horovod_mlstm import checkpoint as ckpt_files
from horovod_mlstm import distributed as dist
from horovod_mlstm.bench.figures import DEVICE_MEMORY, GIB
from horovod_mlstm.bench.projection import allreduce_projection
from horovod_mlstm.metrics import lm_loss
from horovod_mlstm.model import PRECISIONS, ModelConfig, activation_bytes, build_model, set_precision
from horovod_mlstm.update import make_update

PAPER_RANKS = (1, 8, 128)  # one GPU, one DGX-1, the paper's 16 DGX-1 nodes
MICRO_BATCHES = (1, 2, 4, 8)  # --backward_passes_per_step values the capacity table shows
# TensorFlow's BFC allocator for CPU tensors (as on a GPU) instead of plain malloc: it counts the bytes
# in use and their peak (tf.config.experimental.get_memory_info), which RSS only bounds from above.
COUNTING_ALLOCATOR = "TF_CPU_ALLOCATOR_USE_BFC"


def compute_bytes(precision: str) -> int:
    """Bytes of one value in the precision's compute dtype."""
    return tf.as_dtype(tf.keras.mixed_precision.Policy(PRECISIONS[precision]).compute_dtype).size


def working_set_bytes(parameter_bytes: int, precision: str, micro_batches: int = 1) -> int:
    """Parameter-sized temporaries of one update: the gradients, the clipped gradients, the
    weight-normed float32 weights and their gradients (4 float32 copies), the weights and their
    gradients in the compute dtype, and with micro-batches the running sum of the gradients."""
    copies = 4 + 2 * compute_bytes(precision) / 4 + (micro_batches > 1)
    return int(copies * parameter_bytes)


def update_need(parameters: int, hidden: int, streams: int, seq: int, precision: str, micro_batches: int = 1) -> dict:
    """Estimated device bytes of one update: float32 weights, Adam's two moments, the working set and
    the activations of one micro-batch (what a GPU would hold, without its runtime)."""
    weights = 4 * parameters
    parts = {"weights_and_adam": 3 * weights, "working_set": working_set_bytes(weights, precision, micro_batches),
             "activations": activation_bytes(hidden, streams // micro_batches, seq, precision)["total"]}
    return {**parts, "total": sum(parts.values())}


def parameter_count(hidden: int, precision: str) -> int:
    """Trainable parameters of the model build_model makes, built in a graph so nothing is allocated."""
    with tf.Graph().as_default():
        model = build_model(ModelConfig(hidden_size=hidden, precision=precision))
        count = sum(v.shape.num_elements() for v in model.trainable_variables)
    set_precision("fp32")
    return count


def current_rss() -> int:
    """Resident bytes of this process now (ru_maxrss only gives the high-water mark)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MeasurementFailed(RuntimeError):
    """The process measuring a shape died (out of memory, or killed)."""


def check_memory(shapes: list[tuple[str, int]], hidden: int, seq: int, precision: str, micro_batches: int,
                 limit_bytes: float) -> None:
    """Before any measurement: ValueError naming the first shape ((flag, streams)) whose estimated
    peak (a process with TensorFlow loaded, as this one, plus the update's estimated need) exceeds
    the limit."""
    parameters, runtime = parameter_count(hidden, precision), current_rss()
    for flag, streams in shapes:
        need = runtime + update_need(parameters, hidden, streams, seq, precision, micro_batches)["total"]
        if need > limit_bytes:
            raise ValueError(f"hidden {hidden} with {streams} streams x {seq} bytes ({precision}) needs about "
                             f"{need / GIB:.1f} GiB (estimated), over the --paper_memory_limit_gib="
                             f"{limit_bytes / GIB:g} safety limit; lower {flag}, or raise the limit (or pass "
                             "--paper_force) where the memory is free")


def stored_bytes(model, optimizer, streams: int, hidden: int) -> tuple[int, int]:
    """(bytes of a tf.train.Checkpoint of model and optimizer, bytes of one rank's RNN state file)."""
    with tempfile.TemporaryDirectory(prefix="bench-paper-") as tmp:
        tf.train.Checkpoint(model=model, optimizer=optimizer).write(os.path.join(tmp, "ckpt", "ckpt"))
        folder = os.path.join(tmp, "ckpt")
        checkpoint = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
        zeros = np.zeros([streams, hidden], np.float32)
        return checkpoint, os.path.getsize(ckpt_files.save_state_rows(tmp, 0, 0, zeros, zeros))


def nbytes(variables) -> int:
    return sum(v.shape.num_elements() * v.dtype.size for v in variables)


def measure_update(hidden: int, streams: int, seq: int, precision: str, micro_batches: int, threads: int) -> dict:
    """One real update (forward, hand-written backward, Adam) at this per-rank shape, in this process.

    The update splits the streams into `micro_batches` and sums their gradients as train.py's step
    does with --backward_passes_per_step. Meant to run in a fresh process (measure_fresh), so that
    the peak resident size is this update's alone.
    """
    dist.init(intra_op_threads=threads)  # one rank: the allreduce is train.py's, over a world of one
    model = build_model(ModelConfig(hidden_size=hidden, precision=precision))
    variables = model.trainable_variables
    optimizer = tf.keras.optimizers.Adam(1e-3)
    if precision == "mixed_float16":  # as in train.py
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    optimizer.build(variables)
    step = make_update(lm_loss(model), [(optimizer, variables)], micro_batches, clip_norm=1.0)  # train.py's
    rng = np.random.default_rng(0)
    inputs, targets = (tf.constant(rng.integers(0, 256, (streams, seq)), tf.int32) for _ in range(2))
    h, c = (tf.constant(rng.uniform(-1, 1, (streams, hidden)), tf.float32) for _ in range(2))
    rss_built, max_rss_built = current_rss(), max_rss()
    batch = {"inputs": inputs, "targets": targets, "h": h, "c": c}
    norm = float(step(batch, 0.0)[1])  # the first update traces too (a few MB of graphs)
    peak = max_rss()
    tensors_built = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    start = time.perf_counter()
    step(batch, 0.0)  # the second update: timed, and its tensors counted
    seconds = time.perf_counter() - start
    tensor_peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    checkpoint, state = stored_bytes(model, optimizer, streams, hidden)
    return {"hidden": hidden, "streams": streams, "seq_length": seq, "precision": precision,
            "micro_batches": micro_batches, "update_seconds": seconds, "grad_norm": norm,
            "chars_per_s": streams * seq / seconds,
            "memory": {"max_rss_model_built": max_rss_built, "rss_model_built": rss_built,
                       "max_rss_after_update": peak, "growth_in_update": peak - rss_built,
                       "max_rss_after_checkpoint": max_rss(), "tensor_bytes_model_built": tensors_built,
                       "tensor_growth_in_update": tensor_peak - tensors_built},
            "parameters": sum(v.shape.num_elements() for v in variables),
            "parameter_bytes": nbytes(model.variables), "optimizer_bytes": nbytes(optimizer.variables),
            # Gradients have their float32 variables' shapes (dense, also the embedding's).
            "allreduce_bytes": {"fp32": nbytes(variables),
                                "fp16_allreduce": nbytes(variables) // tf.float32.size * tf.float16.size},
            "checkpoint_bytes": checkpoint, "rnn_state_bytes_per_rank": state}


def measure_fresh(**shape) -> dict:
    """measure_update in a new process (spawned, not forked: nothing of this one is inherited), whose
    TensorFlow allocates CPU tensors with its own allocator, which counts the peak bytes in use."""
    saved = os.environ.get(COUNTING_ALLOCATOR)
    os.environ[COUNTING_ALLOCATOR] = "true"  # read by the spawned process's TensorFlow at its start
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(measure_update, **shape).result()
    except (BrokenProcessPool, MemoryError, tf.errors.ResourceExhaustedError):
        raise MeasurementFailed(f"the process measuring {shape['streams']} streams ran out of memory or was killed; "
                                "lower --paper_streams or --paper_fit_streams") from None
    finally:
        if saved is None:
            del os.environ[COUNTING_ALLOCATOR]
        else:
            os.environ[COUNTING_ALLOCATOR] = saved


def fit_per_stream(runs: list[dict]) -> dict | None:
    """Least-squares line through the measured tensor growth against streams: slope per stream and
    intercept, and the slope between each pair of neighbouring stream counts (where the peak moves
    from the parameter-sized phase of the update to the end of the backward pass, they change)."""
    if len({r["streams"] for r in runs}) < 2:
        return None
    streams = [r["streams"] for r in runs]
    growth = [r["memory"]["tensor_growth_in_update"] for r in runs]
    slope, intercept = np.polyfit(streams, growth, 1)
    steps = [(b - a) / (t - s) for s, t, a, b in zip(streams, streams[1:], growth, growth[1:])]
    return {"streams": streams, "slope_bytes_per_stream": float(slope), "intercept_bytes": float(intercept),
            "slopes_between_runs": steps}


def per_rank(result: dict, streams: int) -> list[dict]:
    """One row per --backward_passes_per_step k dividing `streams`: the estimated need, the need from
    the measured fit where there is one, and which devices it fits."""
    shape = {"hidden": result["hidden"], "seq": result["seq_length"], "precision": result["precision"]}
    fit, rows = result.get("fit"), []
    for k in (k for k in MICRO_BATCHES if streams % k == 0):
        need = update_need(result["parameters"], streams=streams, micro_batches=k, **shape)
        row = {"micro_batches": k, "streams_per_micro_batch": streams // k, "computed": need}
        if fit and result["micro_batches"] == 1:  # the measured model and optimizer plus the fitted growth
            row["from_fit"] = (result["parameter_bytes"] + result["optimizer_bytes"] + fit["intercept_bytes"]
                               + fit["slope_bytes_per_stream"] * streams / k
                               + (k > 1) * result["allreduce_bytes"]["fp32"])
        row["fits"] = {name: need["total"] <= size.value for name, size in DEVICE_MEMORY.items()}
        rows.append(row)
    return rows


def capacity(result: dict, streams: int) -> dict:
    """Per-rank memory at `streams` per rank with k micro-batches, and job totals at 1, 8 and 128 ranks,
    from the measured bytes of `result` and the activation estimate (and the fit, where measured)."""
    rows = per_rank(result, streams)
    state = result["rnn_state_bytes_per_rank"] * streams // result["streams"]
    jobs = [{"ranks": n, "global_streams": n * streams, "chars_per_step": n * streams * result["seq_length"],
             "memory_bytes": n * rows[0]["computed"]["total"], "rnn_state_bytes": n * state,
             "checkpoint_bytes": result["checkpoint_bytes"] + n * state,
             "allreduce_bytes_per_rank": {c: 2 * (n - 1) / n * b for c, b in result["allreduce_bytes"].items()}}
            for n in PAPER_RANKS]
    return {"streams_per_rank": streams, "per_rank": rows, "jobs": jobs,
            "allreduce_projection": {c: allreduce_projection(b) for c, b in result["allreduce_bytes"].items()}}


def summarize(runs: dict[int, dict], streams: int) -> dict:
    """The measurement at `streams` with every run, the fit over them, the estimate and the capacity."""
    result = dict(runs[streams])
    shape = (result["hidden"], streams // result["micro_batches"], result["seq_length"], result["precision"])
    result["activations"] = activation_bytes(*shape)
    result["computed_need"] = update_need(result["parameters"], result["hidden"], streams, result["seq_length"],
                                          result["precision"], result["micro_batches"])
    result["runtime_rss"] = current_rss()
    result["runs"] = [runs[count] for count in sorted(runs)]
    result["fit"] = fit_per_stream(result["runs"])
    result["computed_activation_bytes_per_stream"] = (
        activation_bytes(result["hidden"], 1, result["seq_length"], result["precision"])["total"] / result["micro_batches"])
    result["capacity"] = capacity(result, streams)
    return result
