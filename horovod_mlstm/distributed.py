"""Every Horovod call of the project, so the rest reads as plain TensorFlow.

Started with `horovodrun -np N` (or mpirun) there are N ranks; started as a plain
`python ...` Horovod runs with one rank and the same code path works unchanged.
"""

from __future__ import annotations

import hashlib
import os

import tensorflow as tf
import horovod.tensorflow as hvd

_compression = hvd.Compression.none
GRADIENT_REDUCTIONS = ("average", "adasum")
_reduction = "average"


def init(intra_op_threads: int = 0, inter_op_threads: int = 0, fp16_allreduce: bool = False,
         cycle_time_ms: float = 0.0, gradient_reduction: str = "average") -> None:
    """Starts Horovod, pins one GPU per process by local rank, sets CPU thread pools.

    cycle_time_ms > 0 sets Horovod's coordination cycle. Each cycle the background thread of
    every rank exchanges readiness messages even when no tensor is pending; at the default 1 ms
    that traffic takes CPU time from the training step on hosts with few cores.

    gradient_reduction: how allreduce_gradients combines the ranks' gradients, "average" or
    "adasum". Horovod 0.28's CPU Adasum exists only under the MPI controller and for a power-of-2
    number of ranks; anything else is refused here with one line (ValueError, the same on every
    rank) rather than left to fail inside the first step's allreduce.
    """
    global _compression, _reduction
    if gradient_reduction not in GRADIENT_REDUCTIONS:
        raise ValueError(f"gradient reduction must be one of {', '.join(GRADIENT_REDUCTIONS)}, "
                         f"got {gradient_reduction!r}")
    if cycle_time_ms:
        os.environ["HOROVOD_CYCLE_TIME"] = f"{cycle_time_ms:g}"  # read once, by hvd.init()
    hvd.init()
    if gradient_reduction == "adasum" and hvd.size() > 1:
        # Under Gloo the op fails at its first use with "No Adasum operation enabled"; on 3 ranks
        # Horovod raises "Running Adasum with non-power of 2 ranks is not supported yet."
        if not hvd.mpi_enabled():
            raise ValueError(f"Adasum gradient reduction needs Horovod's MPI controller, but these {hvd.size()} ranks "
                             "run on Gloo, which has no Adasum: start the job with horovodrun --mpi (or mpirun)")
        if hvd.size() & (hvd.size() - 1):
            raise ValueError(f"Adasum gradient reduction needs a power-of-2 number of ranks (Horovod's limit), "
                             f"got {hvd.size()}: run on 2, 4, 8, ... ranks")
    _reduction = gradient_reduction
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
    if intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    _compression = hvd.Compression.fp16 if fp16_allreduce else hvd.Compression.none


def rank() -> int:
    return hvd.rank()


def size() -> int:
    return hvd.size()


def local_size() -> int:
    return hvd.local_size()


def is_chief() -> bool:
    """Rank 0 alone writes checkpoints, logs and summaries."""
    return hvd.rank() == 0


def allreduce_gradients(grads):
    """Averages gradients over ranks: one fused ring-allreduce, as hvd.DistributedGradientTape does.

    The training step calls this on gradients it already has, rather than wrapping the tape,
    because the tape's gradient() runs inside the XLA-compiled local step (Horovod ops cannot)
    and because accumulated micro-batches must share one allreduce.

    With init(gradient_reduction="adasum") the ranks' gradients are combined by Adasum instead,
    tensor by tensor: orthogonal gradients add up, parallel ones average; the result is not
    divided by the number of ranks (Adasum needs no learning-rate scaling with ranks). One rank
    keeps its gradients as they are (Adasum of one gradient is itself). Each tensor is its own
    hvd.allreduce (tensor fusion may still batch them): Horovod 0.28.1's grouped_allreduce
    with op=Adasum fails in its own Python code ("UnboundLocalError: cannot access local
    variable 'tensor'", or "'tensor' is used before assignment" inside a tf.function).
    """
    if _reduction == "adasum":
        if hvd.size() == 1:
            return list(grads)
        return [hvd.allreduce(g, op=hvd.Adasum, compression=_compression) for g in grads]
    return hvd.grouped_allreduce(grads, op=hvd.Average, compression=_compression)


def mean(value):
    """Average of a scalar or tensor over ranks (metrics, validation loss)."""
    return hvd.allreduce(tf.convert_to_tensor(value), op=hvd.Average)


def total(value):
    return hvd.allreduce(tf.convert_to_tensor(value), op=hvd.Sum)


def barrier() -> None:
    """Returns on every rank once every rank has called it."""
    hvd.allreduce(tf.zeros([]), op=hvd.Sum, name="barrier")


def agree(error: Exception | None) -> None:
    """Raises on every rank the first error any rank met, so that all stop with the same one line
    instead of the ranks without it failing later in a collective with a peer gone."""
    errors = hvd.allgather_object(error) if hvd.size() > 1 else [error]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def agree_on(settings: dict) -> None:
    """Raises ValueError on every rank, naming the settings whose values differ between ranks: ranks
    that disagree on, say, --train_steps would hang in a collective one of them never reaches."""
    every = hvd.allgather_object(settings) if hvd.size() > 1 else [settings]
    differ = [k for k in settings if any(other.get(k) != settings[k] for other in every)]
    if differ:
        raise ValueError("the ranks were started with different settings: " + "; ".join(
            f"--{k} is " + ", ".join(f"{other.get(k)!r} on rank {r}" for r, other in enumerate(every)) for k in differ))


def replicas_identical(variables) -> bool:
    """True when every rank holds exactly the same bytes in every variable (a SHA-256 of them all)."""
    digest = hashlib.sha256()
    for v in variables:
        digest.update(v.numpy().tobytes())
    every = hvd.allgather_object(digest.hexdigest()) if hvd.size() > 1 else [digest.hexdigest()]
    return len(set(every)) == 1


def broadcast_variables(variables) -> None:
    """Makes every rank's copy equal rank 0's (after init or restore, before step one)."""
    hvd.broadcast_variables(variables, root_rank=0)


def broadcast(value):
    return hvd.broadcast(tf.convert_to_tensor(value), root_rank=0)


def run_elastic(loop, variables, **tracked):
    """Runs `loop(state)` under Horovod elastic: when a worker is lost or hosts change, every
    remaining rank rolls `variables` and `tracked` back to the last `state.commit()`, Horovod
    re-initialises with the new world, rank 0's state is broadcast, and `loop` is entered again.
    """
    from horovod.common.elastic import ObjectState, run_fn
    from horovod.common.exceptions import HorovodInternalError

    class State(ObjectState):
        def __init__(self):
            self._values = [v.numpy() for v in variables]
            super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank, **tracked)

        def save(self):
            self._values = [v.numpy() for v in variables]
            super().save()

        def restore(self):
            for v, value in zip(variables, self._values):
                v.assign(value)
            super().restore()

        def sync(self):
            hvd.broadcast_variables(variables, root_rank=0)
            self._values = [v.numpy() for v in variables]
            super().sync()

    def loop_reporting_lost_workers(state):
        try:
            return loop(state)
        except tf.errors.OpError as e:  # a collective whose peer died: roll back and reset
            if "Horovod" in e.message:
                raise HorovodInternalError(e) from e
            raise

    def reset():
        hvd.shutdown()
        hvd.init()

    return run_fn(loop_reporting_lost_workers, reset)(State())
