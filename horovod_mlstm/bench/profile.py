"""Where the project's update spends its time: a tf.profiler trace of a few updates, its op time
summed by kind of op (matmul, elementwise, casts, TensorArray reads and writes, copies, the
optimizer), and, unprofiled, the update against its forward pass alone, so that the matmul FLOP/s
of each half says which one falls short of the limit.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
import time

import tensorflow as tf

from horovod_mlstm.bench.step import make_step, timed
from horovod_mlstm.model import flops_per_char, set_precision

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


def read_trace(trace_dir: str):
    """The host CPU plane of the newest tf.profiler trace under trace_dir."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {trace_dir}")
    with open(paths[-1], "rb") as f:
        space = xplane_pb2.XSpace.FromString(f.read())
    return next(p for p in space.planes if p.name == "/host:CPU")


def op_seconds(trace_dir: str) -> dict[str, float]:
    """Seconds per op type in a tf.profiler trace, each op event ('name:OpType') counted by its self
    time on its thread: an op running a function (PartitionedCall, While) keeps only what its nested
    ops do not account for. Executor events ('ExecutorState::Process') and intra-op thread-pool work
    are not op events, so nothing is counted twice."""
    plane = read_trace(trace_dir)
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
                totals[open_ops[-1][1]] -= duration * 1e-12
            totals[op_type] = totals.get(op_type, 0.0) + duration * 1e-12
            open_ops.append((start + duration, op_type))
    return totals


def traced_seconds(update, steps: int) -> tuple[float, dict[str, float]]:
    """(wall seconds per update, op seconds per update by op type) of `steps` profiled updates."""
    with tempfile.TemporaryDirectory() as trace_dir:
        tf.profiler.experimental.start(trace_dir)
        start = time.perf_counter()
        for _ in range(steps):
            update().numpy()
        wall = (time.perf_counter() - start) / steps
        tf.profiler.experimental.stop()
        return wall, {k: v / steps for k, v in op_seconds(trace_dir).items()}


def profile_step(hidden: int, precision: str, batch: int, seq: int, steps: int) -> dict:
    """Op seconds per update by kind and by op type, after a warm-up. The profiler's default level
    traces only expensive ops, so loop control (Enter, Merge, NextIteration ...) and executor overhead
    show as wall time in no traced op, which with a sequential recurrence is about wall - ops."""
    forward = make_step(hidden, precision, batch, seq, forward_only=True)
    forward().numpy()  # traced; timed() warms up once more (the first calls after tracing run slow)
    forward_seconds = timed(lambda: forward().numpy(), steps)["median"]
    update = make_step(hidden, precision, batch, seq)
    update().numpy()
    update_seconds = timed(lambda: update().numpy(), steps)["median"]
    wall, by_type = traced_seconds(update, steps)
    set_precision("fp32")
    kinds: dict[str, float] = {}
    for op_type, seconds in by_type.items():
        kinds[op_kind(op_type)] = kinds.get(op_kind(op_type), 0.0) + seconds
    forward_flops = batch * seq * flops_per_char(hidden, training=False)
    return {"hidden": hidden, "precision": precision, "batch": batch, "seq_length": seq, "steps": steps,
            "wall_seconds_per_step": wall, "op_seconds_per_step": sum(kinds.values()),
            "update_seconds": update_seconds, "forward_seconds": forward_seconds,
            "forward_flops_per_s": forward_flops / forward_seconds,
            # None where timing noise exceeds the backward pass (tiny shapes): a difference of medians
            "backward_flops_per_s": (2 * forward_flops / (update_seconds - forward_seconds)
                                     if update_seconds > forward_seconds else None),
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_op_types": sorted(by_type.items(), key=lambda kv: -kv[1])[:12]}
