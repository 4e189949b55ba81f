"""The training step's rate against the machine's matmul limit and the plain Keras baselines.

For each hidden size: the chained matmul rate of the recurrent shape (the limit a recurrence can
reach), then one full update (forward, backward, Adam; no allreduce) of the project's model and of
each Keras baseline at each sequence length and precision, in this process. Every timing is the
median of `repeats` runs after a warm-up, with min and max as the spread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from horovod_mlstm.bench.baselines import BASELINES, baseline_model
from horovod_mlstm.metrics import xent
from horovod_mlstm.model import ModelConfig, build_model, flops_per_char, set_precision

BIG_HIDDEN = 4096  # measured at a smaller batch and window, and without the Keras baselines (minutes per update)


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
    once), so it is a throughput a recurrence cannot reach. A run is about 10 GFLOP (20 to 1,000
    matmuls), so call overhead does not decide a small shape.
    """
    chained, flops, count = chained_matmuls(batch, hidden, dtype)
    a, b = _recurrent_operands(batch, hidden, dtype)

    @tf.function
    def independent():
        acc = tf.zeros([batch, 4 * hidden], dtype)
        for _ in tf.range(count):
            acc += tf.matmul(a, b)
        return acc

    t = timed(chained, repeats)
    t_independent = timed(lambda: independent().numpy(), repeats)
    return {"flops_per_s": flops / t["median"], "seconds": t, "matmuls": count,
            "independent_flops_per_s": flops / t_independent["median"]}


def chained_matmuls(batch: int, hidden: int, dtype) -> tuple[Callable[[], None], float, int]:
    """(run, its FLOPs, its matmuls): one run of the chained limit, about 10 GFLOP (see matmul_rate)."""
    a, b = _recurrent_operands(batch, hidden, dtype)
    flops_each = 2.0 * batch * hidden * 4 * hidden
    count = min(max(20, int(1e10 / flops_each)), 1000)

    @tf.function
    def chained():
        x = a
        for _ in tf.range(count):
            x = tf.matmul(x, b)[:, :hidden]
        return x

    return lambda: chained().numpy(), flops_each * count, count


def _recurrent_operands(batch: int, hidden: int, dtype) -> tuple[tf.Tensor, tf.Tensor]:
    """Random [batch, hidden] and [hidden, 4*hidden] in DTYPE, scaled so a chain of products stays finite."""
    return (tf.cast(tf.random.normal([batch, hidden]), dtype),
            tf.cast(tf.random.normal([hidden, 4 * hidden]) / hidden ** 0.5, dtype))


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


def step_shapes(hidden: int, seq_lengths: list[int], quick: bool) -> tuple[int, list[int]]:
    """Batch and sequence lengths the step is measured at."""
    if quick:
        return 4, [8, 16]
    if hidden == BIG_HIDDEN:
        return 16, [64]  # so that a CPU update takes seconds
    return 64, seq_lengths


def limit_readings(batch: int, hidden: int, before: dict, repeats: int) -> list[dict]:
    """The chained limit read again after the steps, keeping the faster of the two readings per dtype:
    a reading that a busy moment slowed would otherwise inflate every share of this hidden size."""
    limits = []
    for dtype, first in before.items():
        second = matmul_rate(batch, hidden, tf.as_dtype(dtype), repeats)
        rate = max(first, second, key=lambda x: x["flops_per_s"])
        readings = [first["flops_per_s"], second["flops_per_s"]]
        limits.append({"hidden": hidden, "batch": batch, "dtype": dtype, **rate, "readings": readings})
        print(f"[bench] matmul {batch}x{hidden} @ {hidden}x{4 * hidden} {dtype}: "
              f"{rate['flops_per_s'] / 1e9:.1f} GFLOP/s chained (readings before and after the steps: "
              f"{readings[0] / 1e9:.1f}, {readings[1] / 1e9:.1f}), "
              f"{rate['independent_flops_per_s'] / 1e9:.1f} independent", flush=True)
    return limits


def measure_hidden(hidden: int, precisions: list[str], seq_lengths: list[int], repeats: int, quick: bool):
    """(limits, steps) at one hidden size: the matmul limit read before and after the project's and the
    baselines' steps, each step with its share of the limit of its dtype."""
    batch, seqs = step_shapes(hidden, seq_lengths, quick)
    before = {dtype: matmul_rate(batch, hidden, tf.as_dtype(dtype), repeats) for dtype in ("float32", "bfloat16")}
    steps = []
    for seq in seqs:
        for precision in precisions:
            for variant in (None, *BASELINES):
                if variant and hidden == BIG_HIDDEN and not quick:
                    continue
                steps.append(step_rate(hidden, precision, batch, seq, repeats, baseline=variant))
                print(f"[bench] {variant or 'project'} hidden {hidden} seq {seq} {precision}: "
                      f"{steps[-1]['chars_per_s']:,.0f} chars/s, {steps[-1]['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    limits = limit_readings(batch, hidden, before, repeats)
    limit = {x["dtype"]: x["flops_per_s"] for x in limits}
    for r in steps:
        r["fraction_of_matmul_limit"] = r["flops_per_s"] / limit["float32" if r["precision"] == "fp32" else "bfloat16"]
        print(f"[bench] {r.get('variant') or 'project'} hidden {hidden} seq {r['seq_length']} {r['precision']}: "
              f"{r['fraction_of_matmul_limit']:.0%} of the chained matmul limit", flush=True)
    return limits, steps


def ratios(project: list[dict], baseline: list[dict]) -> dict[str, float]:
    """Project vs each baseline and bf16 vs fp32, where both were measured at the same shape."""
    rows = {(r["hidden"], r["seq_length"], r["precision"]): r for r in project}
    out = {}
    for b in baseline:
        p = rows.get((b["hidden"], b["seq_length"], b["precision"]))
        if p:
            out[f"project_over_keras_{b['variant']}_{b['hidden']}_seq{b['seq_length']}_{b['precision']}"] = (
                p["chars_per_s"] / b["chars_per_s"])
    for (hidden, seq, precision), r in rows.items():
        if precision == "mixed_bfloat16" and (hidden, seq, "fp32") in rows:
            out[f"bf16_over_fp32_{hidden}_seq{seq}"] = r["chars_per_s"] / rows[hidden, seq, "fp32"]["chars_per_s"]
    return out
