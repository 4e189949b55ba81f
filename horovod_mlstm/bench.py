"""Benchmark harness: the machine's matmul limit, this project's training step against it and
against a plain Keras mLSTM, 1 -> 2 process scaling, and the input side. One run, one machine.

    python -m horovod_mlstm.bench [--hidden_sizes 256,1024,4096] [--precisions fp32,mixed_bfloat16]
                                  [--repeats 5] [--output bench.json] [--quick]

Every timing is the median of --repeats runs after a warm-up, with min and max as the spread.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from horovod_mlstm import corpus, jobs
from horovod_mlstm.data import ByteStreams
from horovod_mlstm.metrics import xent
from horovod_mlstm.model import PRECISIONS, ModelConfig, build_model, flops_per_char, set_precision
from horovod_mlstm.records import write_corpus

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
    """Achieved FLOP/s of [batch, hidden] @ [hidden, 4*hidden], the recurrent shape."""
    a = tf.cast(tf.random.normal([batch, hidden]), dtype)
    b = tf.cast(tf.random.normal([hidden, 4 * hidden]), dtype)
    count = 20

    @tf.function
    def run():
        acc = tf.zeros([batch, 4 * hidden], dtype)
        for _ in tf.range(count):
            acc += tf.matmul(a, b)
        return acc

    t = timed(lambda: run().numpy(), repeats)
    flops = 2.0 * batch * hidden * 4 * hidden * count
    return {"flops_per_s": flops / t["median"], "seconds": t}


class KerasMLSTMCell(tf.keras.layers.Layer):
    """The mLSTM written the plain way, as a user would: a cell for tf.keras.layers.RNN,
    weight norm and input projections recomputed inside every step, autodiff backward."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = [units, units]

    def build(self, input_shape):
        n_in, n = int(input_shape[-1]), self.units
        self.wx = self.add_weight("wx", [n_in, 4 * n])
        self.wh = self.add_weight("wh", [n, 4 * n], initializer="orthogonal")
        self.wmx = self.add_weight("wmx", [n_in, n])
        self.wmh = self.add_weight("wmh", [n, n], initializer="orthogonal")
        self.b = self.add_weight("b", [4 * n], initializer="zeros")
        self.gs = [self.add_weight(f"g{i}", [k * n], initializer="ones") for i, k in enumerate((4, 4, 1, 1))]

    def call(self, x, states):
        h, c = states
        wx, wh, wmx, wmh = (tf.nn.l2_normalize(w, 0) * g
                            for w, g in zip((self.wx, self.wh, self.wmx, self.wmh), self.gs))
        m = tf.matmul(x, wmx) * tf.matmul(h, wmh)
        i, f, o, u = tf.split(tf.matmul(x, wx) + tf.matmul(m, wh) + self.b, 4, axis=1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(u)
        h = tf.sigmoid(o) * tf.tanh(c)
        return h, [h, c]


def baseline_model(hidden: int, embed: int):
    inputs = tf.keras.Input([None], dtype=tf.int32)
    x = tf.keras.layers.Embedding(256, embed)(inputs)
    x = tf.keras.layers.RNN(KerasMLSTMCell(hidden), return_sequences=True)(x)
    logits = tf.keras.layers.Activation("linear", dtype="float32")(tf.keras.layers.Dense(256)(x))
    return tf.keras.Model(inputs, logits)


def step_rate(hidden: int, precision: str, batch: int, seq: int, repeats: int, plain_keras: bool = False) -> dict:
    """chars/s and FLOP/s of one training update (forward, backward, Adam) in this process."""
    set_precision(precision)
    if plain_keras:
        model = baseline_model(hidden, 64)

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

    @tf.function
    def update():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(xent(y, forward(x, zero)))
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    t = timed(lambda: update().numpy(), repeats)
    set_precision("fp32")
    chars = batch * seq / t["median"]
    return {"hidden": hidden, "precision": precision, "batch": batch, "seq_length": seq, "seconds": t,
            "chars_per_s": chars, "flops_per_s": chars * flops_per_char(hidden)}


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
    quick = FLAGS.quick
    hiddens = [int(h) for h in FLAGS.hidden_sizes.split(",") if h] if not quick else [32]
    precisions = FLAGS.precisions.split(",")
    for p in precisions:
        if p not in PRECISIONS:
            sys.exit(f"error: unknown precision {p!r}; choose from {sorted(PRECISIONS)}")
    repeats = 1 if quick else FLAGS.repeats
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    shape = {256: (64, 256), 1024: (64, 256), 4096: (16, 64)}
    result = {"command": " ".join(sys.argv), "machine": machine(), "limits": [], "project": [], "baseline": []}

    for hidden in hiddens:
        batch, seq = (4, 16) if quick else shape.get(hidden, (64, 256))
        for dtype in ("float32", "bfloat16"):
            rate = matmul_rate(batch, hidden, tf.as_dtype(dtype), repeats)
            result["limits"].append({"hidden": hidden, "batch": batch, "dtype": dtype, **rate})
            print(f"[bench] matmul {batch}x{hidden} @ {hidden}x{4 * hidden} {dtype}: "
                  f"{rate['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
        for precision in precisions:
            for plain, key in ((False, "project"), (True, "baseline")):
                if plain and hidden == 4096 and not quick:
                    continue  # the per-step Keras cell at 4096 takes minutes per update on 2 cores
                r = step_rate(hidden, precision, batch, seq, repeats, plain_keras=plain)
                limit = next(x for x in result["limits"] if x["hidden"] == hidden and
                             x["dtype"] == ("float32" if precision == "fp32" else "bfloat16"))
                r["fraction_of_matmul_limit"] = r["flops_per_s"] / limit["flops_per_s"]
                result[key].append(r)
                print(f"[bench] {key} hidden {hidden} {precision}: {r['chars_per_s']:,.0f} chars/s, "
                      f"{r['flops_per_s'] / 1e9:.1f} GFLOP/s = {r['fraction_of_matmul_limit']:.0%} of matmul",
                      flush=True)

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
    baseline = {(b["hidden"], b["precision"]): b["chars_per_s"] for b in result["baseline"]}
    lines = ["| hidden | batch x seq | precision | matmul limit | this project | of the limit | plain Keras RNN "
             "| project / Keras |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    for p in result["project"]:
        limit = limits[p["hidden"], "float32" if p["precision"] == "fp32" else "bfloat16"]
        keras = baseline.get((p["hidden"], p["precision"]))
        lines.append(f"| {p['hidden']} | {p['batch']} x {p['seq_length']} | {p['precision']} | {limit / 1e9:.0f} GFLOP/s "
                     f"| {p['chars_per_s']:,.0f} chars/s = {p['flops_per_s'] / 1e9:.0f} GFLOP/s "
                     f"| {p['fraction_of_matmul_limit']:.0%} | "
                     + (f"{keras:,.0f} chars/s | {p['chars_per_s'] / keras:.2f}x |" if keras else "not run | |"))
    return "\n".join(lines)


def ratios(result: dict) -> None:
    """Project vs baseline and bf16 vs fp32, where both were measured."""
    rows = {(r["hidden"], r["precision"]): r for r in result["project"]}
    out = {}
    for b in result["baseline"]:
        p = rows.get((b["hidden"], b["precision"]))
        if p:
            out[f"project_over_keras_{b['hidden']}_{b['precision']}"] = p["chars_per_s"] / b["chars_per_s"]
    for (hidden, precision), r in rows.items():
        if precision == "mixed_bfloat16" and (hidden, "fp32") in rows:
            out[f"bf16_over_fp32_{hidden}"] = r["chars_per_s"] / rows[hidden, "fp32"]["chars_per_s"]
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
            "tensorflow": tf.__version__, "threads": FLAGS.threads}


if __name__ == "__main__":
    flags.DEFINE_string("hidden_sizes", "256,1024,4096", "mLSTM sizes to measure (empty: only scaling and input).")
    flags.DEFINE_string("precisions", "fp32,mixed_bfloat16", "Precisions to measure.")
    flags.DEFINE_integer("repeats", 5, "Timed repeats after one warm-up.")
    flags.DEFINE_integer("threads", 2, "TensorFlow intra-op threads for the in-process measurements.")
    flags.DEFINE_bool("scaling", True, "Measure 1 vs 2 processes with real train.py runs.")
    flags.DEFINE_bool("quick", False, "Tiny sizes, one repeat: a smoke test of the harness.")
    flags.DEFINE_string("output", "bench.json", "Where the JSON results go.")
    app.run(main)
