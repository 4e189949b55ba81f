"""Benchmark harness: the machine's matmul limit, this project's training step against it and
against two plain Keras mLSTMs (weight norm per step, and none), 1 -> 2 process scaling, and the
input side. One run, one machine.

    python -m horovod_mlstm.bench [--hidden_sizes 256,1024,4096] [--precisions fp32,mixed_bfloat16]
                                  [--seq_lengths 128,256] [--repeats 5] [--output bench.json] [--quick]

Every timing is the median of --repeats runs after a warm-up, with min and max as the spread.

    python -m horovod_mlstm.bench --paper [--paper_hidden 4096] [--paper_streams 256] [--paper_seq 256]
                                  [--paper_precision mixed_bfloat16] [--paper_fit_streams 8,16,32,64]

measures instead the memory, communication and checkpoint bytes of one real update at the paper's
per-rank shape, each run in a fresh process (see paper_main); it refuses shapes whose computed peak
exceeds 8 GiB unless --paper_force is given.

    python -m horovod_mlstm.bench --profile [--hidden_sizes 1024] [--precisions mixed_bfloat16] [--seq_lengths 256]

profiles the project's step instead (tf.profiler) and prints where its time goes by kind of op:
matmul, elementwise, casts, TensorArray reads and writes, copies, the optimizer, and the wall time
in no traced op (loop control and executor overhead).
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import platform
import re
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import tensorflow as tf
from absl import app, flags

from horovod_mlstm import checkpoint as ckpt_files
from horovod_mlstm import corpus, distributed as dist, jobs, kernels
from horovod_mlstm.data import ByteStreams
from horovod_mlstm.metrics import lm_loss, xent
from horovod_mlstm.model import PRECISIONS, ModelConfig, build_model, flops_per_char, set_precision
from horovod_mlstm.records import write_corpus
from horovod_mlstm.update import make_update

FLAGS = flags.FLAGS


def timed(fn, repeats: int) -> dict:
    """Median, min and max seconds of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": float(np.median(times)), "min": float(min(times)), "max": float(max(times))}


def matmul_rate(batch: int, hidden: int, dtype, repeats: int) -> dict:
    """Achieved FLOP/s of [batch, hidden] @ [hidden, 4*hidden], the recurrent shape.

    flops_per_s, the limit the step is compared with, chains the matmuls as a recurrence does: each
    one's input is the first `hidden` columns of the previous one's output. independent_flops_per_s
    sums independent products instead, which the while loop lets overlap (up to 10 iterations at
    once), so it is a throughput a recurrence cannot reach: at hidden 256 it measured 1.7x the
    chained rate. A run is about 10 GFLOP (20 to 1,000 matmuls), so call overhead does not decide
    a small shape. Rates are medians, as the step's are; main() reads the limit twice and keeps the
    faster reading.
    """
    a = tf.cast(tf.random.normal([batch, hidden]), dtype)
    b = tf.cast(tf.random.normal([hidden, 4 * hidden]) / hidden ** 0.5, dtype)
    flops_each = 2.0 * batch * hidden * 4 * hidden
    count = min(max(20, int(1e10 / flops_each)), 1000)

    @tf.function
    def chained():
        x = a
        for _ in tf.range(count):
            x = tf.matmul(x, b)[:, :hidden]
        return x

    @tf.function
    def independent():
        acc = tf.zeros([batch, 4 * hidden], dtype)
        for _ in tf.range(count):
            acc += tf.matmul(a, b)
        return acc

    t = timed(lambda: chained().numpy(), repeats)
    t_independent = timed(lambda: independent().numpy(), repeats)
    return {"flops_per_s": flops_each * count / t["median"], "seconds": t, "matmuls": count,
            "independent_flops_per_s": flops_each * count / t_independent["median"]}


BASELINES = {"weight_norm": True, "no_weight_norm": False}  # plain Keras variant -> weight norm per step


class KerasMLSTMCell(tf.keras.layers.Layer):
    """The mLSTM written the plain way, as a user would: a cell for tf.keras.layers.RNN, input
    projections (and, with weight_norm, the weight norm) recomputed inside every step, autodiff
    backward. Without weight norm it is the fairest plain baseline: no per-step work the project's
    step does not also need."""

    def __init__(self, units: int, weight_norm: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.units, self.weight_norm = units, weight_norm
        self.state_size = [units, units]

    def build(self, input_shape):
        n_in, n = int(input_shape[-1]), self.units
        self.wx = self.add_weight("wx", [n_in, 4 * n])
        self.wh = self.add_weight("wh", [n, 4 * n], initializer="orthogonal")
        self.wmx = self.add_weight("wmx", [n_in, n])
        self.wmh = self.add_weight("wmh", [n, n], initializer="orthogonal")
        self.b = self.add_weight("b", [4 * n], initializer="zeros")
        if self.weight_norm:
            self.gs = [self.add_weight(f"g{i}", [k * n], initializer="ones") for i, k in enumerate((4, 4, 1, 1))]

    def call(self, x, states):
        h, c = states
        wx, wh, wmx, wmh = self.wx, self.wh, self.wmx, self.wmh
        if self.weight_norm:
            wx, wh, wmx, wmh = (tf.nn.l2_normalize(w, 0) * g for w, g in zip((wx, wh, wmx, wmh), self.gs))
        m = tf.matmul(x, wmx) * tf.matmul(h, wmh)
        i, f, o, u = tf.split(tf.matmul(x, wx) + tf.matmul(m, wh) + self.b, 4, axis=1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(u)
        h = tf.sigmoid(o) * tf.tanh(c)
        return h, [h, c]


def baseline_model(hidden: int, embed: int, weight_norm: bool):
    inputs = tf.keras.Input([None], dtype=tf.int32)
    x = tf.keras.layers.Embedding(256, embed)(inputs)
    x = tf.keras.layers.RNN(KerasMLSTMCell(hidden, weight_norm), return_sequences=True)(x)
    logits = tf.keras.layers.Activation("linear", dtype="float32")(tf.keras.layers.Dense(256)(x))
    return tf.keras.Model(inputs, logits)


def make_step(hidden: int, precision: str, batch: int, seq: int, baseline: str | None = None,
              forward_only: bool = False):
    """One training update (forward, backward, Adam) as a tf.function on fixed random bytes: the
    project's step, or with `baseline` (a key of BASELINES) the plain Keras one. forward_only: the
    loss alone, no gradients (the profile's forward/backward split). Sets the precision policy; the
    caller resets it."""
    set_precision(precision)
    if baseline:
        model = baseline_model(hidden, 64, BASELINES[baseline])

        def forward(x, state):
            return model(x)
    else:
        model = build_model(ModelConfig(hidden_size=hidden, embed_size=64, precision=precision))

        def forward(x, state):
            return model(x, state)[0]

    optimizer = tf.keras.optimizers.Adam(1e-3)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (batch, seq)), tf.int32)
    y = tf.constant(rng.integers(0, 256, (batch, seq)), tf.int32)
    zero = (tf.zeros([batch, hidden]), tf.zeros([batch, hidden]))

    def loss():
        return tf.reduce_mean(xent(y, forward(x, zero)))

    @tf.function
    def update():
        with tf.GradientTape() as tape:
            value = loss()
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(value, variables), variables))
        return value

    return tf.function(loss) if forward_only else update


def step_rate(hidden: int, precision: str, batch: int, seq: int, repeats: int, baseline: str | None = None) -> dict:
    """chars/s and FLOP/s of make_step's update in this process."""
    update = make_step(hidden, precision, batch, seq, baseline)
    t = timed(lambda: update().numpy(), repeats)
    set_precision("fp32")
    chars = batch * seq / t["median"]
    return {"hidden": hidden, "precision": precision, "batch": batch, "seq_length": seq, "seconds": t,
            "chars_per_s": chars, "flops_per_s": chars * flops_per_char(hidden),
            **({"variant": baseline} if baseline else {})}


# Kinds of op in a step's profile, by the op type after the last ':' of a profiler event; first match wins.
OP_KINDS = (
    ("matmul", r"MatMul|Einsum"),
    ("fused gate kernels", r"MlstmGates"),
    ("TensorArray reads and writes", r"TensorList|TensorArray"),
    ("casts", r"Cast"),
    ("optimizer and variables", r"Apply|Assign|ReadVariable|VarHandle"),
    ("elementwise and reductions", r"Sigmoid|Tanh|Mul|Add|Sub|Select|Maximum|Minimum|Neg|Square|Sqrt|Exp|Log|Div|Pow"
                                   r"|Where|Less|Greater|Equal|Logical|Sum|Mean|Max|Min|Softmax|Bias|Sign|Abs"),
    ("slices, concats and copies", r"Slice|Split|Concat|Transpose|Reshape|Pack|Unpack|Gather|Tile|Fill|Zeros|Ones"
                                   r"|Const|Shape|Range|Squeeze|ExpandDims|Copy"),
)


def op_kind(op_type: str) -> str:
    return next((kind for kind, pattern in OP_KINDS if re.search(pattern, op_type)), "other")


def op_seconds(trace_dir: str) -> dict[str, float]:
    """Seconds per op type in a tf.profiler trace, each op event ('name:OpType') counted by its self
    time on its thread: an op running a function (PartitionedCall, While) keeps only what its nested
    ops do not account for. Executor events ('ExecutorState::Process') and intra-op thread-pool work
    are not op events, so nothing is counted twice."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {trace_dir}")
    with open(paths[-1], "rb") as f:
        space = xplane_pb2.XSpace.FromString(f.read())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    totals: dict[str, float] = {}
    for line in plane.lines:
        if line.name == "python":
            continue
        ops = []
        for event in line.events:
            name = plane.event_metadata[event.metadata_id].name
            if re.fullmatch(r"[^\s:]+:[A-Za-z_]\w*", name):
                ops.append((event.offset_ps, event.duration_ps, name.rsplit(":", 1)[1]))
        open_ops: list[tuple[int, str]] = []  # (end, op type) of the ops enclosing the current one
        for start, duration, op_type in sorted(ops, key=lambda o: (o[0], -o[1])):
            while open_ops and open_ops[-1][0] <= start:
                open_ops.pop()
            if open_ops:
                parent = open_ops[-1][1]
                totals[parent] -= duration * 1e-12
            totals[op_type] = totals.get(op_type, 0.0) + duration * 1e-12
            open_ops.append((start + duration, op_type))
    return totals


def profile_step(hidden: int, precision: str, batch: int, seq: int, steps: int) -> dict:
    """Where the project's update spends its time: op seconds per step by kind and by op type, from
    a TensorFlow profile of `steps` updates after a warm-up. The profiler's default level traces
    only expensive ops, so loop control (Enter, Merge, NextIteration ...) and executor overhead
    show as wall time not in any traced op, which with a sequential recurrence is about wall - ops.
    Unprofiled, it also times the update and its forward pass alone: the split of matmul FLOP/s
    between forward and backward (with Adam) says which half falls short."""
    forward = make_step(hidden, precision, batch, seq, forward_only=True)
    forward().numpy()  # traced; timed() warms up once more (the first calls after tracing run slow)
    forward_seconds = timed(lambda: forward().numpy(), steps)["median"]
    update = make_step(hidden, precision, batch, seq)
    update().numpy()
    update_seconds = timed(lambda: update().numpy(), steps)["median"]
    with tempfile.TemporaryDirectory() as trace_dir:
        tf.profiler.experimental.start(trace_dir)
        start = time.perf_counter()
        for _ in range(steps):
            update().numpy()
        wall = (time.perf_counter() - start) / steps
        tf.profiler.experimental.stop()
        by_type = {k: v / steps for k, v in op_seconds(trace_dir).items()}
    set_precision("fp32")
    chars = batch * seq
    kinds: dict[str, float] = {}
    for op_type, seconds in by_type.items():
        kind = op_kind(op_type)
        kinds[kind] = kinds.get(kind, 0.0) + seconds
    ops = sum(kinds.values())
    return {"hidden": hidden, "precision": precision, "batch": batch, "seq_length": seq, "steps": steps,
            "wall_seconds_per_step": wall, "op_seconds_per_step": ops,
            "update_seconds": update_seconds, "forward_seconds": forward_seconds,
            "forward_flops_per_s": chars * flops_per_char(hidden, training=False) / forward_seconds,
            "backward_flops_per_s": chars * 2 * flops_per_char(hidden, training=False) / (update_seconds - forward_seconds),
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_op_types": sorted(by_type.items(), key=lambda kv: -kv[1])[:12]}


def profile_table(p: dict) -> str:
    lines = [f"hidden {p['hidden']}, {p['batch']} x {p['seq_length']}, {p['precision']}: "
             f"{p['wall_seconds_per_step'] * 1e3:,.0f} ms per step, {p['op_seconds_per_step'] * 1e3:,.0f} ms in ops "
             f"(summed over threads)",
             f"unprofiled: update {p['update_seconds'] * 1e3:,.0f} ms, of which forward {p['forward_seconds'] * 1e3:,.0f} ms "
             f"at {p['forward_flops_per_s'] / 1e9:.0f} GFLOP/s; backward and Adam at "
             f"{p['backward_flops_per_s'] / 1e9:.0f} GFLOP/s", "", "| kind of op | ms per step | share of op time |", "|---|---:|---:|"]
    lines += [f"| {kind} | {s * 1e3:,.1f} | {s / p['op_seconds_per_step']:.1%} |" for kind, s in p["kinds"].items()]
    outside = p["wall_seconds_per_step"] - p["op_seconds_per_step"]
    if outside > 0:
        lines.append(f"| wall time in no traced op (loop control, executor, waits) | {outside * 1e3:,.1f} | |")
    return "\n".join(lines)


def step_shapes(hidden: int, seq_lengths: list[int], quick: bool) -> tuple[int, list[int]]:
    """Batch and sequence lengths the step is measured at."""
    if quick:
        return 4, [8, 16]
    if hidden == 4096:
        return 16, [64]  # so that a CPU update takes seconds
    return 64, seq_lengths


def profile_main(hiddens: list[int], precisions: list[str], seq_lengths: list[int], quick: bool):
    """--profile: the breakdown of the project's step at each shape the step rates use."""
    results = []
    for hidden in hiddens:
        batch, seqs = step_shapes(hidden, seq_lengths, quick)
        for seq in seqs:
            for precision in precisions:
                results.append(profile_step(hidden, precision, batch, seq, 1 if quick else FLAGS.repeats))
                print(profile_table(results[-1]) + "\n", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump({"command": " ".join(sys.argv), "machine": machine(), "profiles": results}, f, indent=2)
    print(f"[bench] wrote {FLAGS.output}")


def train_rate(np_: int, hidden: int, batch: int, seq: int, steps: int, data_dir: str,
               controller: str = "gloo", extra: tuple[str, ...] = ()) -> list[float]:
    """Median chars/s per worker of real train.py runs, one thread per process.

    np_ > 1 with controller "gloo" or "mpi" is one horovodrun job of np_ ranks (one figure);
    controller "independent" is np_ separate single-process jobs started together, which
    measures what the machine itself gives np_ concurrent trainings (one figure per job).
    """
    def args():
        return [f"--model_dir={tempfile.mkdtemp(prefix='bench-run-')}", f"--data_dir={data_dir}",
                f"--hidden_size={hidden}", f"--batch_size_per_worker={batch}", f"--seq_length={seq}",
                f"--train_steps={steps}", "--log_every=2", "--eval_every=0", "--eval_windows=1",
                f"--checkpoint_every={steps}", "--warmup_steps=1", "--intra_op_threads=1", "--inter_op_threads=1",
                *extra]

    if controller == "independent":
        outputs = jobs.run_together([args() for _ in range(np_)])
    else:
        outputs = [jobs.run(args(), np_, controller)]
    rates = []
    for text in outputs:
        per_worker = [float(v.replace(",", "")) for v in re.findall(r"\(([\d,]+)/worker\)", text)]
        rates.append(float(np.median(per_worker[1:] or per_worker)))  # the first window includes tracing
    return rates


def scaling(quick: bool) -> dict:
    """1 process against 2 on this machine: Horovod with Gloo and MPI at the project's cycle time,
    Gloo at Horovod's own 1 ms default, and two independent processes (the machine's ceiling)."""
    hidden, batch, seq, steps = (32, 4, 16, 6) if quick else (1024, 32, 128, 12)
    runs = {"2_gloo": ("gloo", ()), "2_mpi": ("mpi", ()),
            "2_gloo_cycle_1ms": ("gloo", ("--cycle_time_ms=1",)), "2_independent": ("independent", ())}
    with tempfile.TemporaryDirectory() as data_dir:
        write_corpus(corpus.texts(3000, seed=4), data_dir, num_shards=2, val_fraction=0.05, test_fraction=0.05)
        one = train_rate(1, hidden, batch, seq, steps, data_dir)[0]
        two = {name: float(np.mean(train_rate(2, hidden, batch, seq, steps, data_dir, controller, extra)))
               for name, (controller, extra) in runs.items()}
    result = {"hidden": hidden, "batch_per_worker": batch, "seq_length": seq, "precision": "fp32",
              "chars_per_s_per_worker": {"1": one, **two},
              "efficiency": {name.removeprefix("2_"): v / one for name, v in two.items()}}
    print(f"[bench] scaling hidden {hidden}, {batch}x{seq} per worker: 1 process {one:,.0f} chars/s; 2 processes "
          "per worker: " + ", ".join(f"{name.removeprefix('2_')} {v:,.0f} (efficiency {v / one:.2f})"
                                     for name, v in two.items()), flush=True)
    return result


def input_rates(repeats: int) -> dict:
    """Window pipeline bytes/s per rank and preprocessing MB/s, on the built-in corpus grammar."""
    texts = list(corpus.texts(4000, seed=3))
    with tempfile.TemporaryDirectory() as tmp:
        t = timed(lambda: write_corpus(texts, os.path.join(tmp, "out"), num_shards=2), repeats)
    megabytes = sum(len(s.encode()) + 1 for s in texts) / 1e6
    streams = ByteStreams(np.frombuffer(("\n".join(texts) * 4).encode(), np.uint8), rows=32, seq_length=256)
    count = min(200, streams.windows_per_epoch)
    p = timed(lambda: [None for _ in streams.dataset(0, count)], repeats)
    return {"pipeline_bytes_per_s": count * 32 * 256 / p["median"], "pipeline_seconds": p,
            "preprocess_mb_per_s": megabytes / t["median"], "preprocess_seconds": t}


def main(argv):
    del argv
    if FLAGS.paper:
        return paper_main()
    quick = FLAGS.quick
    hiddens = [int(h) for h in FLAGS.hidden_sizes.split(",") if h] if not quick else [32]
    precisions = FLAGS.precisions.split(",")
    for p in precisions:
        if p not in PRECISIONS:
            sys.exit(f"error: unknown precision {p!r}; choose from {sorted(PRECISIONS)}")
    repeats = 1 if quick else FLAGS.repeats
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    try:
        seq_lengths = [int(x) for x in FLAGS.seq_lengths]
    except ValueError:
        sys.exit(f"error: --seq_lengths must be integers, got {','.join(FLAGS.seq_lengths)}")
    if FLAGS.profile:
        return profile_main(hiddens, precisions, seq_lengths, quick)
    result = {"command": " ".join(sys.argv), "machine": machine(), "limits": [], "project": [], "baseline": []}

    for hidden in hiddens:
        batch, seqs = step_shapes(hidden, seq_lengths, quick)
        before = {dtype: matmul_rate(batch, hidden, tf.as_dtype(dtype), repeats) for dtype in ("float32", "bfloat16")}
        steps = []
        for seq in seqs:
            for precision in precisions:
                for variant in (None, *BASELINES):
                    if variant and hidden == 4096 and not quick:
                        continue  # the per-step Keras cell at 4096 takes minutes per update on 2 cores
                    steps.append(step_rate(hidden, precision, batch, seq, repeats, baseline=variant))
                    print(f"[bench] {variant or 'project'} hidden {hidden} seq {seq} {precision}: "
                          f"{steps[-1]['chars_per_s']:,.0f} chars/s, {steps[-1]['flops_per_s'] / 1e9:.1f} GFLOP/s",
                          flush=True)
        # The limit is read again after the steps, and the faster reading counts: one reading that a busy
        # moment slowed would otherwise inflate every share of this hidden size (the two readings of one
        # run differed by up to 17%; single readings of 245-323 GFLOP/s at 1024 bf16 made shares of 74-105%).
        limit = {}
        for dtype, first in before.items():
            second = matmul_rate(batch, hidden, tf.as_dtype(dtype), repeats)
            rate = max(first, second, key=lambda x: x["flops_per_s"])
            readings = [first["flops_per_s"], second["flops_per_s"]]
            limit[dtype] = rate["flops_per_s"]
            result["limits"].append({"hidden": hidden, "batch": batch, "dtype": dtype, **rate, "readings": readings})
            print(f"[bench] matmul {batch}x{hidden} @ {hidden}x{4 * hidden} {dtype}: "
                  f"{rate['flops_per_s'] / 1e9:.1f} GFLOP/s chained (readings before and after the steps: "
                  f"{readings[0] / 1e9:.1f}, {readings[1] / 1e9:.1f}), "
                  f"{rate['independent_flops_per_s'] / 1e9:.1f} independent", flush=True)
        for r in steps:
            r["fraction_of_matmul_limit"] = r["flops_per_s"] / limit["float32" if r["precision"] == "fp32" else "bfloat16"]
            result["baseline" if r.get("variant") else "project"].append(r)
            print(f"[bench] {r.get('variant') or 'project'} hidden {hidden} seq {r['seq_length']} {r['precision']}: "
                  f"{r['fraction_of_matmul_limit']:.0%} of the chained matmul limit", flush=True)

    if FLAGS.scaling:
        try:
            result["scaling"] = scaling(quick)
        except jobs.JobError as e:
            sys.exit(f"error: {e}")

    result["input"] = input_rates(repeats)
    print(f"[bench] input pipeline {result['input']['pipeline_bytes_per_s'] / 1e6:.1f} MB/s per rank; "
          f"preprocess {result['input']['preprocess_mb_per_s']:.1f} MB/s", flush=True)
    ratios(result)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=2)
    print(table(result))
    print(f"[bench] wrote {FLAGS.output}")


def table(result: dict) -> str:
    """The step-rate rows as the Markdown table of docs/PERFORMANCE.md."""
    limits = {(x["hidden"], x["dtype"]): x["flops_per_s"] for x in result["limits"]}
    keras = {(b["variant"], b["hidden"], b["seq_length"], b["precision"]): b["chars_per_s"] for b in result["baseline"]}
    lines = ["| hidden | batch x seq | precision | matmul limit (chained) | this project | of the limit "
             "| Keras, weight norm per step | project / it | Keras, no weight norm | project / it |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in result["project"]:
        limit = limits[p["hidden"], "float32" if p["precision"] == "fp32" else "bfloat16"]
        row = (f"| {p['hidden']} | {p['batch']} x {p['seq_length']} | {p['precision']} | {limit / 1e9:.0f} GFLOP/s "
               f"| {p['chars_per_s']:,.0f} chars/s = {p['flops_per_s'] / 1e9:.0f} GFLOP/s "
               f"| {p['fraction_of_matmul_limit']:.0%} |")
        for variant in BASELINES:
            rate = keras.get((variant, p["hidden"], p["seq_length"], p["precision"]))
            row += f" {rate:,.0f} chars/s | {p['chars_per_s'] / rate:.2f}x |" if rate else " not run | |"
        lines.append(row)
    return "\n".join(lines)


def ratios(result: dict) -> None:
    """Project vs each baseline and bf16 vs fp32, where both were measured at the same shape."""
    rows = {(r["hidden"], r["seq_length"], r["precision"]): r for r in result["project"]}
    out = {}
    for b in result["baseline"]:
        p = rows.get((b["hidden"], b["seq_length"], b["precision"]))
        if p:
            out[f"project_over_keras_{b['variant']}_{b['hidden']}_seq{b['seq_length']}_{b['precision']}"] = (
                p["chars_per_s"] / b["chars_per_s"])
    for (hidden, seq, precision), r in rows.items():
        if precision == "mixed_bfloat16" and (hidden, seq, "fp32") in rows:
            out[f"bf16_over_fp32_{hidden}_seq{seq}"] = r["chars_per_s"] / rows[hidden, seq, "fp32"]["chars_per_s"]
    result["ratios"] = out
    for k, v in out.items():
        print(f"[bench] {k}: {v:.2f}x")


def machine() -> dict:
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        text = open("/proc/cpuinfo").read()
        found = re.search(r"model name\s*:\s*(.+)", text)
        cpu = found.group(1) if found else cpu
        flags_ = set(re.findall(r"\b(avx512_bf16|avx512f|amx_bf16|avx2)\b", text))
    else:
        flags_ = set()
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": sorted(flags_), "python": platform.python_version(),
            "tensorflow": tf.__version__, "threads": FLAGS.threads, "gate_math": kernels.status()}


# ---------------------------------------------------------------- the paper's per-rank shape

GIB = 2 ** 30
PAPER_MEMORY_LIMIT = 8 * GIB  # what one measurement may take of this machine's 24 GiB, shared with other jobs
PAPER_RANKS = (1, 8, 128)  # one GPU, one DGX-1, the paper's 16 DGX-1 nodes
MICRO_BATCHES = (1, 2, 4, 8)  # --backward_passes_per_step values the capacity table shows
DEVICES = {"V100 16 GB": 16 * GIB, "V100 32 GB": 32 * GIB, "H100 80 GB": 80 * GIB}


def compute_dtype_bytes(precision: str) -> int:
    return tf.as_dtype(tf.keras.mixed_precision.Policy(PRECISIONS[precision]).compute_dtype).size


def activation_bytes(hidden: int, streams: int, seq: int, precision: str) -> dict:
    """Bytes of the per-timestep tensors one update keeps, from their shapes and dtypes in model.py.

    saved_by_forward: what _forward(save=True) keeps for the backward pass: x_m (a contiguous copy
    of the projections' last n columns) and hm in the compute dtype; the four gates, c_prev and
    tanh_c in float32 (the array's per-step elements, never stacked).
    read_by_backward: the input projections [T, B, 5n] in the compute dtype and the float32
    gradient d_hs [T, B, n] that _backward reads.
    kept_by_backward: the TensorArrays _backward fills over the reverse loop: d_z [T, B, 4n] and
    d_m [T, B, n], in the compute dtype.
    stacked_by_backward: after the loop, those arrays stacked (a copy while the arrays still live),
    then d_xm, d_hm, m and h_prev [T, B, n] and d_proj = concat(d_z, d_xm) [T, B, 5n]. Counted as
    alive together as the backward pass ends, which is when the update's memory peaks.
    """
    d, f32 = compute_dtype_bytes(precision), 4
    cells = streams * seq * hidden
    parts = {"saved_by_forward": cells * (2 * d + 6 * f32),
             "read_by_backward": cells * (5 * d + f32),
             "kept_by_backward": cells * 5 * d,
             "stacked_by_backward": cells * (5 * d + 4 * d + 5 * d)}
    return {**parts, "total": sum(parts.values())}


def working_set_bytes(parameter_bytes: int, precision: str, micro_batches: int = 1) -> int:
    """Parameter-sized temporaries of one update: the gradients, the clipped gradients, the
    weight-normed float32 weights and their gradients (4 float32 copies), the weights and their
    gradients in the compute dtype, and with micro-batches the running sum of the gradients."""
    copies = 4 + 2 * compute_dtype_bytes(precision) / 4 + (micro_batches > 1)
    return int(copies * parameter_bytes)


def update_need(parameters: int, hidden: int, streams: int, seq: int, precision: str, micro_batches: int = 1) -> dict:
    """Computed device bytes of one update: float32 weights, Adam's two moments, the working set
    and the activations of one micro-batch (what a GPU would hold, without its runtime)."""
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


def paper_measure(hidden: int, streams: int, seq: int, precision: str, micro_batches: int, threads: int) -> dict:
    """One real update (forward, hand-written backward, Adam) at this per-rank shape, in this process.

    The update splits the streams into `micro_batches` and sums their gradients as train.py's step
    does with --backward_passes_per_step. Meant to run in a fresh process, so that the peak
    resident size is this update's alone.
    """
    dist.init(intra_op_threads=threads)  # one rank: the allreduce is train.py's, over a world of one
    model = build_model(ModelConfig(hidden_size=hidden, precision=precision))
    variables = model.trainable_variables
    optimizer = tf.keras.optimizers.Adam(1e-3)
    if precision == "mixed_float16":  # as in train.py
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    optimizer.build(variables)
    step = make_update(lm_loss(model), [(optimizer, variables)], micro_batches, clip_norm=1.0)  # train.py's

    def update(inputs, targets, h, c):
        return step({"inputs": inputs, "targets": targets, "h": h, "c": c}, 0.0)[1]

    rng = np.random.default_rng(0)
    inputs, targets = (tf.constant(rng.integers(0, 256, (streams, seq)), tf.int32) for _ in range(2))
    h, c = (tf.constant(rng.uniform(-1, 1, (streams, hidden)), tf.float32) for _ in range(2))
    baseline_rss, baseline_max_rss = current_rss(), max_rss()
    norm = float(update(inputs, targets, h, c))  # the first update traces too (a few MB of graphs)
    peak = max_rss()
    start = time.perf_counter()
    update(inputs, targets, h, c)  # timed: the second, traced already
    seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="bench-paper-") as tmp:
        tf.train.Checkpoint(model=model, optimizer=optimizer).write(os.path.join(tmp, "ckpt", "ckpt"))
        folder = os.path.join(tmp, "ckpt")
        checkpoint = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
        zeros = np.zeros([streams, hidden], np.float32)
        state = os.path.getsize(ckpt_files.save_state_rows(tmp, 0, 0, zeros, zeros))

    def nbytes(vs):
        return sum(v.shape.num_elements() * v.dtype.size for v in vs)

    return {"hidden": hidden, "streams": streams, "seq_length": seq, "precision": precision,
            "micro_batches": micro_batches, "update_seconds": seconds, "grad_norm": norm,
            "chars_per_s": streams * seq / seconds,
            "memory": {"max_rss_model_built": baseline_max_rss, "rss_model_built": baseline_rss,
                       "max_rss_after_update": peak, "growth_in_update": peak - baseline_rss,
                       "max_rss_after_checkpoint": max_rss()},
            "parameters": sum(v.shape.num_elements() for v in variables),
            "parameter_bytes": nbytes(model.variables), "optimizer_bytes": nbytes(optimizer.variables),
            # Gradients have their float32 variables' shapes (dense, also the embedding's).
            "allreduce_bytes": {"fp32": nbytes(variables),
                                "fp16_allreduce": nbytes(variables) // tf.float32.size * tf.float16.size},
            "checkpoint_bytes": checkpoint, "rnn_state_bytes_per_rank": state}


def measure_fresh(**shape) -> dict:
    """paper_measure in a new process (spawned, not forked: nothing of this one is inherited)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(paper_measure, **shape).result()


def fit_per_stream(runs: list[dict]) -> dict | None:
    """Least-squares line through the measured growth against streams: slope per stream and intercept,
    and the slope between each pair of neighbouring stream counts."""
    if len({r["streams"] for r in runs}) < 2:
        return None
    streams = [r["streams"] for r in runs]
    growth = [r["memory"]["growth_in_update"] for r in runs]
    slope, intercept = np.polyfit(streams, growth, 1)
    # Slopes between neighbouring runs: where the peak moves from the parameter-sized phase of the
    # update (weight gradients, Adam) to the end of the backward pass, they change.
    steps = [(b - a) / (t - s) for s, t, a, b in zip(streams, streams[1:], growth, growth[1:])]
    return {"streams": streams, "slope_bytes_per_stream": float(slope), "intercept_bytes": float(intercept),
            "slopes_between_runs": steps}


# Stated bandwidths of a DGX-1 (V100) cluster, per direction, for the allreduce projection.
NVLINK_BYTES_PER_S = 6 * 25e9  # per V100: six NVLink 2.0 links of 25 GB/s
INFINIBAND_NODE_BYTES_PER_S = 4 * 100e9 / 8  # per node: four 100 Gb/s EDR InfiniBand adapters
NODES, GPUS_PER_NODE = 16, 8


def ring_seconds(nbytes: float, ranks: int, bytes_per_s: float) -> float:
    """Bandwidth term of a ring allreduce: each rank sends and receives 2(N-1)/N of the buffer."""
    return 2 * (ranks - 1) / ranks * nbytes / bytes_per_s


def allreduce_projection(nbytes: int) -> dict:
    """Seconds to allreduce `nbytes` on 16 DGX-1 nodes, from the stated bandwidths (latency ignored).

    flat_one_ring: one ring through all 128 GPUs; it leaves each node on one 100 Gb/s adapter.
    flat_four_rings: four rings, a quarter of the buffer each, one per adapter (what NCCL does).
    hierarchical: reduce-scatter over NVLink in each node, 8 allreduces of 1/8 of the buffer across
    the 16 nodes sharing the node's four adapters, allgather over NVLink (HOROVOD_HIERARCHICAL_ALLREDUCE).
    """
    ranks, inter = NODES * GPUS_PER_NODE, INFINIBAND_NODE_BYTES_PER_S
    intra = 2 * (GPUS_PER_NODE - 1) / GPUS_PER_NODE * nbytes / NVLINK_BYTES_PER_S
    across = ring_seconds(nbytes / GPUS_PER_NODE, NODES, inter / GPUS_PER_NODE)
    return {"flat_one_ring": ring_seconds(nbytes, ranks, inter / 4),
            "flat_four_rings": ring_seconds(nbytes, ranks, inter),
            "hierarchical": intra + across, "hierarchical_nvlink_part": intra, "hierarchical_infiniband_part": across}


def capacity(result: dict, streams: int) -> dict:
    """Per-rank memory at `streams` per rank with k micro-batches, and job totals at 1, 8 and 128 ranks,
    from the measured bytes of `result` and the activation formula (and the fit, where measured)."""
    shape = {"hidden": result["hidden"], "seq": result["seq_length"], "precision": result["precision"]}
    fit = result.get("fit")
    per_rank = []
    for k in (k for k in MICRO_BATCHES if streams % k == 0):
        need = update_need(result["parameters"], streams=streams, micro_batches=k, **shape)
        row = {"micro_batches": k, "streams_per_micro_batch": streams // k, "computed": need}
        if fit and result["micro_batches"] == 1:  # the measured model and optimizer plus the fitted growth
            row["from_fit"] = (result["parameter_bytes"] + result["optimizer_bytes"] + fit["intercept_bytes"]
                               + fit["slope_bytes_per_stream"] * streams / k
                               + (k > 1) * result["allreduce_bytes"]["fp32"])
        row["fits"] = {name: need["total"] <= size for name, size in DEVICES.items()}
        per_rank.append(row)
    state = result["rnn_state_bytes_per_rank"] * streams // result["streams"]
    jobs_ = [{"ranks": n, "global_streams": n * streams, "chars_per_step": n * streams * result["seq_length"],
              "memory_bytes": n * per_rank[0]["computed"]["total"], "rnn_state_bytes": n * state,
              "checkpoint_bytes": result["checkpoint_bytes"] + n * state,
              "allreduce_bytes_per_rank": {c: 2 * (n - 1) / n * b for c, b in result["allreduce_bytes"].items()}}
             for n in PAPER_RANKS]
    return {"streams_per_rank": streams, "per_rank": per_rank, "jobs": jobs_,
            "allreduce_projection": {c: allreduce_projection(b) for c, b in result["allreduce_bytes"].items()}}


def paper_main():
    """--paper: each shape measured in its own fresh process, after checking it fits the memory limit."""
    hidden, streams, seq, precision = FLAGS.paper_hidden, FLAGS.paper_streams, FLAGS.paper_seq, FLAGS.paper_precision
    try:
        fit_streams = [int(x) for x in FLAGS.paper_fit_streams.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"error: --paper_fit_streams={FLAGS.paper_fit_streams!r} is not a list of stream counts like 8,16,32")
    k = FLAGS.paper_micro_batches
    if min([hidden, streams, seq, k, *fit_streams]) < 1:
        sys.exit("error: --paper_hidden, --paper_streams, --paper_seq, --paper_micro_batches and "
                 "--paper_fit_streams must be positive")
    if any(s % k for s in [streams, *fit_streams]):
        sys.exit(f"error: --paper_micro_batches={k} must divide --paper_streams and every --paper_fit_streams")
    parameters = parameter_count(hidden, precision)
    runtime = current_rss()  # this process with TensorFlow loaded: where a fresh measuring process starts
    for flag, count in [("--paper_streams", streams)] + [("--paper_fit_streams", s) for s in fit_streams]:
        need = runtime + update_need(parameters, hidden, count, seq, precision, k)["total"]
        if need > PAPER_MEMORY_LIMIT and not FLAGS.paper_force:
            sys.exit(f"error: hidden {hidden} with {count} streams x {seq} bytes ({precision}) needs about "
                     f"{need / GIB:.1f} GiB (computed), over the {PAPER_MEMORY_LIMIT / GIB:.0f} GiB limit of this "
                     f"shared machine; lower {flag}, or pass --paper_force on a machine with the memory")

    runs = {}
    for count in sorted({streams, *fit_streams}):
        try:
            runs[count] = measure_fresh(hidden=hidden, streams=count, seq=seq, precision=precision,
                                        micro_batches=k, threads=FLAGS.threads)
        except (BrokenProcessPool, MemoryError, tf.errors.ResourceExhaustedError):
            sys.exit(f"error: the process measuring {count} streams ran out of memory or was killed; "
                     "lower --paper_streams or --paper_fit_streams")
        r = runs[count]
        print(f"[bench] paper shape hidden {hidden}, {count} streams x {seq}, {precision}, k={k}: update "
              f"{r['update_seconds']:.1f} s, peak RSS {r['memory']['max_rss_after_update'] / GIB:.2f} GiB, "
              f"growth {r['memory']['growth_in_update'] / GIB:.2f} GiB", flush=True)
    result = dict(runs[streams])
    result["activations"] = activation_bytes(hidden, streams // k, seq, precision)
    result["computed_need"] = update_need(parameters, hidden, streams, seq, precision, k)
    result["runtime_rss"] = runtime
    result["runs"] = [runs[c] for c in sorted(runs)]
    result["fit"] = fit_per_stream(result["runs"])
    result["computed_activation_bytes_per_stream"] = activation_bytes(hidden, 1, seq, precision)["total"] / k
    result["capacity"] = capacity(result, streams)
    result["command"], result["machine"] = " ".join(sys.argv), machine()
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=2)
    print(paper_tables(result))
    print(f"[bench] wrote {FLAGS.output}")


def gib(nbytes: float) -> str:
    """Bytes in GiB, or in MiB below one GiB."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2 ** 20:.1f} MiB"


def paper_tables(result: dict) -> str:
    """The measurement, the fit and the capacity as Markdown tables (docs/CAPACITY.md)."""
    m, fit = result["memory"], result["fit"]
    act = result["activations"]
    lines = [f"hidden {result['hidden']}, {result['streams']} streams x {result['seq_length']} bytes per rank, "
             f"{result['precision']}, {result['micro_batches']} micro-batch(es); one update in a fresh process", "",
             "| quantity | bytes | how |", "|---|---:|---|",
             f"| peak RSS of the process (ru_maxrss) | {gib(m['max_rss_after_update'])} | measured |",
             f"| model built (RSS before the update) | {gib(m['rss_model_built'])} | measured |",
             f"| growth in the update | {gib(m['growth_in_update'])} | measured |",
             f"| activations at the end of the backward pass | {gib(act['total'])} | computed: "
             + ", ".join(f"{k} {gib(v)}" for k, v in act.items() if k != "total") + " |",
             f"| activations per stream: computed / fitted slope of the growth | "
             f"{gib(result['computed_activation_bytes_per_stream'])}"
             + (f" / {gib(fit['slope_bytes_per_stream'])} | fit over {fit['streams']} streams (intercept "
                f"{gib(fit['intercept_bytes'])}; working set computed {gib(result['computed_need']['working_set'])}) |"
                if fit else " / (no fit) | |"),
             f"| parameters ({result['parameters']:,}) | {gib(result['parameter_bytes'])} | real variables |",
             f"| optimizer state (Adam) | {gib(result['optimizer_bytes'])} | real variables |",
             f"| allreduced per step, float32 / --fp16_allreduce | {gib(result['allreduce_bytes']['fp32'])} / "
             f"{gib(result['allreduce_bytes']['fp16_allreduce'])} | real gradients |",
             f"| checkpoint, rank 0's model + optimizer | {gib(result['checkpoint_bytes'])} | "
             "written with tf.train.Checkpoint |",
             f"| RNN state, per rank / whole job at 128 ranks | {gib(result['rnn_state_bytes_per_rank'])} / "
             f"{gib(128 * result['rnn_state_bytes_per_rank'])} | written with checkpoint.save_state_rows |",
             f"| update time | {result['update_seconds']:.1f} s ({result['chars_per_s']:,.0f} chars/s) | measured |",
             "", "| streams | update s | peak RSS | growth | growth per stream since the row above "
             "| computed activations |",
             "|---:|---:|---:|---:|---:|---:|"]
    steps = [None] + (fit["slopes_between_runs"] if fit else [])
    for r, step in zip(result["runs"], steps):
        computed = activation_bytes(r["hidden"], r["streams"] // r["micro_batches"], r["seq_length"], r["precision"])
        lines.append(f"| {r['streams']} | {r['update_seconds']:.1f} | {gib(r['memory']['max_rss_after_update'])} | "
                     f"{gib(r['memory']['growth_in_update'])} | {gib(step) if step else ''} | "
                     f"{gib(computed['total'])} |")
    return "\n".join(lines + ["", capacity_tables(result, result["capacity"])])


def capacity_tables(result: dict, cap: dict) -> str:
    """capacity(result, streams) as Markdown: per rank, per job, and the allreduce projection."""
    lines = [f"Per rank at {cap['streams_per_rank']} streams (computed device bytes: weights + Adam, "
              "working set, activations of one micro-batch; no runtime). Rows with k > 1 assume the micro-batches "
              "run one after another, which train.py's step does not ensure (docs/CAPACITY.md):", "",
              "| --backward_passes_per_step | streams per micro-batch | per-rank memory | from the fit | "
              + " | ".join(DEVICES) + " |", "|---:|---:|---:|---:|" + "---|" * len(DEVICES)]
    for row in cap["per_rank"]:
        lines.append(f"| {row['micro_batches']} | {row['streams_per_micro_batch']} | {gib(row['computed']['total'])} | "
                     + (gib(row["from_fit"]) if "from_fit" in row else "") + " | "
                     + " | ".join("fits" if ok else "**does not fit**" for ok in row["fits"].values()) + " |")
    lines += ["", "| ranks | global streams | chars per step | memory, all ranks | RNN state | checkpoint | "
              "allreduce sent per rank, fp32 / fp16 |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for j in cap["jobs"]:
        sent = j["allreduce_bytes_per_rank"]
        lines.append(f"| {j['ranks']} | {j['global_streams']:,} | {j['chars_per_step']:,} | {gib(j['memory_bytes'])} | "
                     f"{gib(j['rnn_state_bytes'])} | {gib(j['checkpoint_bytes'])} | "
                     f"{gib(sent['fp32'])} / {gib(sent['fp16_allreduce'])} |")
    lines += ["", "PROJECTION (not measured): ring allreduce of one step's gradients on 16 DGX-1 nodes, "
              "2(N-1)/N x bytes / bandwidth, NVLink 150 GB/s per GPU, 4 x 100 Gb/s EDR per node, latency ignored:", "",
              "| gradients | flat, one ring (100 Gb/s) | flat, four rings (4 x 100 Gb/s) "
              "| hierarchical (NVLink + IB) |",
              "|---|---:|---:|---:|"]
    for name, p in cap["allreduce_projection"].items():
        lines.append(f"| {name}: {gib(result['allreduce_bytes'][name])} | {p['flat_one_ring'] * 1e3:.1f} ms | "
                     f"{p['flat_four_rings'] * 1e3:.1f} ms | {p['hierarchical'] * 1e3:.1f} ms "
                     f"({p['hierarchical_nvlink_part'] * 1e3:.1f} + {p['hierarchical_infiniband_part'] * 1e3:.1f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    flags.DEFINE_string("hidden_sizes", "256,1024,4096", "mLSTM sizes to measure (empty: only scaling and input).")
    flags.DEFINE_string("precisions", "fp32,mixed_bfloat16", "Precisions to measure.")
    flags.DEFINE_list("seq_lengths", ["128", "256"], "Bytes per window for the step rates (batch 64; hidden 4096 "
                      "uses 16 x 64).")
    flags.DEFINE_integer("repeats", 5, "Timed repeats after one warm-up.")
    flags.DEFINE_integer("threads", 2, "TensorFlow intra-op threads for the in-process measurements.")
    flags.DEFINE_bool("scaling", True, "Measure 1 vs 2 processes with real train.py runs.")
    flags.DEFINE_bool("quick", False, "Tiny sizes, one repeat: a smoke test of the harness.")
    flags.DEFINE_string("output", "bench.json", "Where the JSON results go.")
    flags.DEFINE_bool("profile", False, "Profile the project's step instead, at the step rates' shapes: op time "
                      "by kind, to --output.")
    flags.DEFINE_bool("paper", False, "Measure one update at the paper's per-rank shape instead (memory, bytes).")
    flags.DEFINE_integer("paper_hidden", 4096, "--paper: mLSTM units.")
    flags.DEFINE_integer("paper_streams", 256, "--paper: streams (sequences) per rank.")
    flags.DEFINE_integer("paper_seq", 256, "--paper: bytes per window.")
    flags.DEFINE_enum("paper_precision", "mixed_bfloat16", list(PRECISIONS), "--paper: precision (bf16 stands in "
                      "on CPU for the GPU's fp16: same byte sizes).")
    flags.DEFINE_integer("paper_micro_batches", 1, "--paper: micro-batches per update (--backward_passes_per_step).")
    flags.DEFINE_string("paper_fit_streams", "8,16,32,64", "--paper: further stream counts to measure for the "
                        "linear fit of memory against streams; empty = none.")
    flags.DEFINE_bool("paper_force", False, "--paper: run even when the computed peak exceeds 8 GiB.")
    app.run(main)
