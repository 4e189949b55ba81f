"""Data-parallel mLSTM pretraining: one training loop, read top to bottom.

    horovodrun -np 2 -H localhost:2 python train.py --flagfile=configs/cpu_demo.cfg
    python train.py --flagfile=configs/cpu_demo.cfg          # one process, same code

`run()` reads in sections: input -> model and optimizer -> update step -> checkpoint and resume ->
loop -> summary, and this file defines what they call in that order. The state lives in explicit
objects: TrainState (what a checkpoint restores besides the model and optimizer), Progress (what the
loop reports) and Job (what the loop needs). Horovod is only touched through
horovod_mlstm.distributed. A job restarted with the same --model_dir resumes where it stopped, on
any number of ranks that divides its global batch; a second job on a --model_dir in use is refused.

Stopping early: SIGTERM, SIGUSR1 or SIGINT (what a scheduler sends before a time limit or
preemption, or Ctrl-C), or --max_runtime_minutes, make every rank stop after the same step (the
request rides along with each step's allreduce), checkpoint, and exit with status 75
(stopping.EXIT_STOPPED); the same command resumes. A diverging loss stops the job with an error before a
checkpoint of it is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import uuid

import numpy as np
import tensorflow as tf
from absl import app, logging

from horovod_mlstm import checkpoint as state_files
from horovod_mlstm import corpus, data, files, kernels, modeldir, stallwatch, stopping
from horovod_mlstm import distributed as dist
from horovod_mlstm.checkpoint import CheckpointError, CheckpointMismatch, Checkpointer
from horovod_mlstm.data import ByteStreams
from horovod_mlstm.flags import TrainConfig, define_training
from horovod_mlstm.metrics import LN2, bits_per_char, lm_loss, make_eval_step
from horovod_mlstm.model import build_model
from horovod_mlstm.records import DataError
from horovod_mlstm.schedule import WarmupDecaySchedule
from horovod_mlstm.stopping import StopRequest
from horovod_mlstm.update import make_update


class Diverged(Exception):
    """The loss blew up; the job stops before writing a checkpoint of it."""


def run(cfg: TrainConfig, stop: StopRequest) -> dict | None:
    """Trains to --train_steps; returns the summary (None when there was nothing left to train)."""
    tf.keras.utils.set_random_seed(cfg.seed)
    if not cfg.elastic:  # elastic ranks agree at each entry of the loop instead (a late joiner meets no earlier call)
        dist.agree_on(settings_of(cfg))

    # ---------------------------------------------------------------- input
    # The global batch stays fixed for the job: elastic resets and restarts on another world keep it.
    streams = Streams.of(cfg, dist.size())
    if not cfg.data_dir:
        corpus.prepare_builtin(cfg.data_path)  # atomic: safe for every rank to call at once
    streams.check()  # on every rank before any collective, so a bad data dir is one line from each

    # ------------------------------------------------------ model and optimizer
    model = build_model(cfg.model_config())
    peak_lr = cfg.peak_lr(dist.size())
    schedule, optimizer = build_optimizer(cfg, peak_lr, model.trainable_variables)
    state = TrainState(streams.train_rows, cfg.hidden_size)

    # ------------------------------------------------------------ update step
    update = make_update(lm_loss(model), [(optimizer, model.trainable_variables)], cfg.backward_passes_per_step,
                         cfg.clip_norm, cfg.xla)
    train_step = make_train_step(update, state)

    # -------------------------------------------------- checkpoint and resume
    checkpoints = Checkpoints(cfg, model, optimizer, state, streams)
    restored, history = open_model_dir(cfg, checkpoints)  # rank 0; every rank gets its state before step one

    # ------------------------------------------------------------------- loop
    job = Job(cfg, streams, model, optimizer, schedule, peak_lr, state, checkpoints, train_step,
              make_eval_step(model), stop, tf.summary.create_file_writer(os.path.join(cfg.model_dir, "tensorboard")))
    progress = Progress(first_step=state.current_step, history=history, last_checkpoint=restored,
                        resumed_from=restored)
    synced = model.variables + optimizer.variables + state.counters_list()
    if cfg.elastic:  # lost workers are Horovod elastic's to handle
        dist.run_elastic(lambda elastic: train_loop(job, progress, elastic), synced, world_steps={},
                         job_token=checkpoints.token)
    else:
        dist.broadcast_variables(synced)  # rank 0's (restored or initial) state to every rank
        job.watch = stallwatch.watch(cfg.model_dir, dist.rank(), dist.size())  # names a frozen rank
        train_loop(job, progress)
        if job.watch:
            job.watch.stop()

    # ---------------------------------------------------------------- summary
    steps_this_run = state.current_step - progress.first_step
    if not steps_this_run:
        if dist.is_chief():
            print(f"[train] {cfg.model_dir} is already at step {state.current_step} (--train_steps="
                  f"{cfg.train_steps}): nothing to train; its checkpoints and summary.json are unchanged. Raise "
                  "--train_steps to train further.", flush=True)
        return None
    return write_summary(job, progress, steps_this_run)


# ---------------------------------------------------------------- input

@dataclasses.dataclass(frozen=True)
class Streams:
    """The job's byte streams, fixed for its life: one layout whatever the number of ranks (data.py),
    so a checkpoint continues exactly on another world of the same global batch.

    Validation streams are fixed too; --eval_batch_size keeps them the same across runs with
    different batches, so their validation BPC compares.
    """

    data_path: str
    train_rows: int  # the global batch in sequences: rows_per_worker per rank at start
    val_rows: int
    seq_length: int

    @classmethod
    def of(cls, cfg: TrainConfig, world: int) -> "Streams":
        return cls(cfg.data_path, cfg.rows_per_worker * world,
                   (cfg.eval_batch_size or cfg.batch_size_per_worker) * world, cfg.seq_length)

    @property
    def chars_per_step(self) -> int:
        return self.train_rows * self.seq_length

    def check(self) -> None:
        data.check_split(self.data_path, "train", self.train_rows, self.seq_length)
        data.check_split(self.data_path, "val", self.val_rows, self.seq_length)

    def rows(self, world: int) -> int:
        if self.train_rows % world:
            raise ValueError(f"{self.train_rows} streams do not divide over {world} ranks")
        return self.train_rows // world

    def for_rank(self, rank: int, world: int) -> tuple[ByteStreams, ByteStreams]:
        """(train, validation) streams of this rank: its slice of the job's layout."""
        rows, L = self.rows(world), self.seq_length
        val_first, val_end = rank * self.val_rows // world, (rank + 1) * self.val_rows // world
        return (data.split_streams(self.data_path, "train", self.train_rows, L, rank * rows, rows),
                data.split_streams(self.data_path, "val", self.val_rows, L, val_first, val_end - val_first))


# ---------------------------------------------------------------- model, optimizer and state

def build_optimizer(cfg: TrainConfig, peak_lr: float, variables) -> tuple[WarmupDecaySchedule, tf.keras.optimizers.Optimizer]:
    """Adam on the warmup/decay schedule; float16 gets a dynamic loss scale. Built, so it can be restored."""
    schedule = WarmupDecaySchedule(peak_lr, cfg.warmup_steps, cfg.horizon, cfg.lr_decay)
    optimizer = tf.keras.optimizers.Adam(schedule, beta_1=cfg.adam_beta1, beta_2=cfg.adam_beta2,
                                         epsilon=cfg.adam_epsilon)
    if modeldir.loss_scaled(cfg.precision):
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    optimizer.build(variables)
    return schedule, optimizer


class TrainState:
    """What a checkpoint restores besides the model and optimizer, and this rank's rows of the RNN state.

    The counters are the same on every rank (rank 0's are broadcast); h and c hold this rank's streams
    (their row count follows the world size; checkpoints keep them per rank).
    """

    def __init__(self, streams: int, hidden: int):
        def counter(name, value=0):
            return tf.Variable(value, dtype=tf.int64, trainable=False, name=name)

        self.step, self.position = counter("step"), counter("data_position")
        self.skipped, self.chars_seen = counter("skipped_steps"), counter("chars_seen")
        self.streams = counter("streams", streams)
        self.h = tf.Variable(tf.zeros([0, hidden]), shape=[None, hidden], trainable=False, name="state_h")
        self.c = tf.Variable(tf.zeros([0, hidden]), shape=[None, hidden], trainable=False, name="state_c")

    def counters(self) -> dict:
        """The counters under their names in a checkpoint."""
        return {"step": self.step, "position": self.position, "skipped": self.skipped,
                "chars_seen": self.chars_seen, "streams": self.streams}

    def counters_list(self) -> list:
        return list(self.counters().values())

    @property
    def current_step(self) -> int:
        return int(self.step.numpy())


# ---------------------------------------------------------------- update step

def make_train_step(update, state: TrainState):
    """One step of the loop: the update on the carried state (zeroed where the streams start over),
    then the counters. Returns (loss, grad_norm, finite, stop_votes)."""
    def train_step(inputs, targets, reset, stop_vote):
        keep = tf.cast(tf.logical_not(reset), tf.float32)
        batch = {"inputs": inputs, "targets": targets, "h": state.h * keep, "c": state.c * keep}
        loss, norm, finite, votes, (h, c) = update(batch, stop_vote)
        state.skipped.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
        state.h.assign(h)
        state.c.assign(c)
        state.step.assign_add(1)
        state.position.assign_add(1)
        return loss, norm, finite, votes

    return train_step


# ---------------------------------------------------------------- checkpoint and resume

class Checkpoints:
    """This job's checkpoints: rank 0 writes the model, optimizer and counters, every rank its own rows
    of the RNN state (checkpoint.py). save_state and save are collectives: every rank calls them."""

    def __init__(self, cfg: TrainConfig, model, optimizer, state: TrainState, streams: Streams):
        self.cfg, self.model, self.state, self.streams = cfg, model, state, streams
        self.manager = Checkpointer(cfg.model_dir, cfg.keep_checkpoints, writer=dist.is_chief(), model=model,
                                    optimizer=optimizer, **state.counters())
        self.directory = self.manager.directory
        self.lock = None  # modeldir.Lock, held by the rank that writes
        self.token = uuid.uuid4().hex  # names this job in the lock file (elastic ranks share rank 0's)

    def restore(self) -> str | None:
        """Rank 0: the newest checkpoint that fits this job, or None (a fresh start)."""
        return self.manager.restore(check=self._usable)

    def _usable(self, path: str) -> None:
        """A checkpoint is used only if it has this job's streams and all of their RNN state."""
        saved = modeldir.checkpoint_value(path, "streams")
        if saved != self.streams.train_rows:
            raise CheckpointMismatch(
                f"the checkpoint {path} carries {saved} streams but this job has {self.streams.train_rows} (ranks x "
                "batch_size_per_worker x backward_passes_per_step); restart with the same global batch, or use "
                "another --model_dir")
        state_files.check_state(self.directory, state_files.step_of(path), self.streams.train_rows,
                                self.cfg.hidden_size)

    def hold_lock(self, token: str) -> None:
        """The writing rank holds the model dir's lock; after an elastic reset a new rank 0 takes it over,
        unless a live process of this same job (TOKEN) still holds it."""
        if self.lock is None:
            try:
                self.lock = modeldir.Lock(self.cfg.model_dir).acquire(token)
            except modeldir.ModelDirBusy as busy:
                if busy.token != token:
                    raise

    def load_state(self, rank: int, rows: int) -> None:
        """This rank's rows of every stream's state at the current step (zeros at step 0)."""
        step, hidden = self.state.current_step, self.cfg.hidden_size
        h, c = (state_files.load_state_rows(self.directory, step, rank * rows, rows, hidden) if step
                else (np.zeros([rows, hidden], np.float32),) * 2)
        self.state.h.assign(h)
        self.state.c.assign(c)

    def save_state(self, rank: int, rows: int) -> None:
        """Every rank writes its rows of the state at the current step."""
        step = self.state.current_step
        if dist.is_chief():
            state_files.clear_state(self.directory, step)  # what an interrupted attempt at this step wrote
        dist.barrier()
        error = None
        try:
            state_files.save_state_rows(self.directory, step, rank * rows, self.state.h.numpy(), self.state.c.numpy())
        except OSError as e:
            error = CheckpointError(f"rank {rank} cannot write its RNN state to "
                                    f"{state_files.state_dir(self.directory, step)}: {e.strerror}")
        dist.agree(error)

    def save(self, rank: int, rows: int, keep: tuple = ()) -> str:
        """RNN state from every rank, then rank 0 writes the model and optimizer; returns the checkpoint's
        path. KEEP: steps whose RNN state must survive the pruning (elastic commits)."""
        step = self.state.current_step
        self.save_state(rank, rows)
        error = None
        if dist.is_chief():
            try:
                if not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in self.model.variables):
                    raise Diverged(f"the weights are not finite at step {step}; not checkpointing them "
                                   f"(the last good checkpoint stays in {self.directory})")
                logging.info("checkpoint %s", self.manager.save(step))
                self.manager.prune_states(also_keep=keep)
            except (CheckpointError, Diverged) as e:
                error = e
        dist.agree(error)
        return os.path.join(self.directory, f"ckpt-{step}")

    def save_milestone(self, chars: int, train_bpc: float) -> None:
        """The model alone, as a model dir of its own that evaluate and transfer read (a collective)."""
        error = None
        if dist.is_chief():
            info = {"milestone_chars": chars, "chars_seen": int(self.state.chars_seen.numpy()),
                    "step": self.state.current_step, "train_bpc": train_bpc}
            try:
                modeldir.write_model(modeldir.milestone_dir(self.cfg.model_dir, chars), self.model,
                                     self.state.current_step, "milestone.json", info)
            except (CheckpointError, OSError) as e:
                error = CheckpointError(f"cannot write the milestone at {chars:,} characters: {e}")
        dist.agree(error)


def open_model_dir(cfg: TrainConfig, checkpoints: Checkpoints) -> tuple[str | None, list[dict]]:
    """Rank 0 takes the model dir (created, locked, config.json written) and restores the newest usable
    checkpoint; every rank gets (that checkpoint or None, the validation history up to its step). An error
    is the same one line on every rank."""
    restored, history, error = None, [], None
    if dist.is_chief():
        try:
            modeldir.create(cfg.model_dir, cfg.model_config())
            checkpoints.hold_lock(checkpoints.token)
            modeldir.write_config(cfg.model_dir, cfg.model_config())
            restored = checkpoints.restore()
            history = modeldir.earlier_history(cfg.model_dir, checkpoints.state.current_step) if restored else []
        except (CheckpointError, ValueError, OSError) as e:
            error = e
    if cfg.elastic and error:
        raise error  # no collective before the elastic loop: a worker joining later would never meet it
    if not cfg.elastic:
        dist.agree(error)
    return restored, history


# ---------------------------------------------------------------- loop

@dataclasses.dataclass
class Job:
    """What the loop needs, built by run()'s sections."""

    cfg: TrainConfig
    streams: Streams
    model: tf.keras.Model
    optimizer: tf.keras.optimizers.Optimizer
    schedule: WarmupDecaySchedule
    peak_lr: float
    state: TrainState
    checkpoints: Checkpoints
    train_step: object
    eval_step: object
    stop: StopRequest
    writer: object  # TensorBoard
    watch: stallwatch.StallWatch | None = None


@dataclasses.dataclass
class Progress:
    """What the loop reports (progress lines, TensorBoard, summary.json); kept across elastic resets."""

    first_step: int
    history: list
    last_checkpoint: str | None
    resumed_from: str | None
    started: float = dataclasses.field(default_factory=time.time)
    train_bpc: float = math.nan
    val_bpc: float = math.nan
    world_steps: dict = dataclasses.field(default_factory=dict)  # world size -> steps trained at it
    stopped: str | None = None
    last_commit: int | None = None  # elastic: where a lost worker rolls every rank back to


@dataclasses.dataclass
class Window:
    """The steps since the last progress line."""

    loss: float = 0.0
    steps: int = 0
    started: float = dataclasses.field(default_factory=time.time)
    skipped_in_a_row: int = 0


def train_loop(job: Job, progress: Progress, elastic=None) -> None:
    """Runs from the current step to --train_steps. Entered once, or again after each elastic reset."""
    cfg, state = job.cfg, job.state
    rank, world = dist.rank(), dist.size()
    rows, train_streams, val_streams = enter(job, rank, world, elastic)
    start = state.current_step
    progress.last_commit = start if elastic else None
    world_steps = dict(elastic.world_steps if elastic else progress.world_steps)
    if start >= cfg.train_steps:
        # An elastic reset after the final commit lands here: the committed counts are the run's.
        progress.world_steps = world_steps
        return
    announce(job, progress, world, rows, start, elastic)
    window = Window()
    batches = iter(train_streams.dataset(int(state.position.numpy())))
    for _ in range(start, cfg.train_steps):
        batch = next(batches)
        loss, norm, finite, votes = job.train_step(batch["inputs"], batch["targets"], batch["reset"],
                                                   tf.constant(job.stop.vote()))
        state.chars_seen.assign_add(job.streams.chars_per_step)
        world_steps[world] = world_steps.get(world, 0) + 1
        step = state.current_step
        if job.watch:
            job.watch.progress(step)
        guard(cfg, step, float(loss), bool(finite), window, progress)  # the same decision on every rank
        if dist.is_chief():
            with job.writer.as_default(step=step):
                tf.summary.scalar("learning_rate", job.schedule(step - 1))
        save_milestones(job, progress)
        if step % cfg.log_every == 0 or step == cfg.train_steps:
            report_progress(job, progress, window, step, float(norm), world)
            window = Window(skipped_in_a_row=window.skipped_in_a_row)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.train_steps:
            evaluate(job, progress, val_streams, step, world)
            window.started = time.time()
        stopping = float(votes) > 0
        save_checkpoint(job, progress, rank, rows, stopping, elastic, world_steps)
        if stopping:
            progress.stopped = job.stop.reason or "another rank's request"
            break
    progress.world_steps = world_steps


def enter(job: Job, rank: int, world: int, elastic) -> tuple[int, ByteStreams, ByteStreams]:
    """On (re)entering the loop: this rank's share of the streams and its rows of the RNN state, with the
    ranks agreeing on the job's settings; after an elastic reset the new rank 0 takes over the lock."""
    error, rows, train_streams, val_streams = None, 0, None, None
    try:
        if elastic:
            dist.agree_on(settings_of(job.cfg))
            if dist.is_chief():
                job.checkpoints.hold_lock(elastic.job_token)
        rows = job.streams.rows(world)
        train_streams, val_streams = job.streams.for_rank(rank, world)
        job.checkpoints.load_state(rank, rows)
    except (DataError, CheckpointError, ValueError) as e:
        error = e
    dist.agree(error)
    return rows, train_streams, val_streams


def settings_of(cfg: TrainConfig) -> dict:
    """The settings every rank must share (threads are per host and may differ)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("intra_op_threads", "inter_op_threads")}


def announce(job: Job, progress: Progress, world: int, rows: int, start: int, elastic) -> None:
    """The job's first line: its shape, learning rate, precision, gate math and where it starts."""
    if not dist.is_chief():
        return
    cfg = job.cfg
    where = (f"resumed from {progress.resumed_from} at step {start}" if progress.resumed_from and not elastic
             else f"continuing at step {start}" if start else "starting from scratch")
    print(f"[train] {world} rank(s) x {rows} streams x {cfg.seq_length} bytes = global batch "
          f"{job.streams.train_rows} sequences ({job.streams.chars_per_step} chars/step); peak LR {job.peak_lr:.3g} "
          f"({cfg.batch_scaling} scaling); " + ("Adasum gradient reduction; " if cfg.gradient_reduction == "adasum" else "")
          + f"{cfg.precision}; hidden {cfg.hidden_size}; gate math: "
          + ("TensorFlow ops (--xla)" if cfg.xla else kernels.status()) + f"; {where}", flush=True)


def guard(cfg: TrainConfig, step: int, loss: float, finite: bool, window: Window, progress: Progress) -> None:
    """Stops the job (Diverged) on a loss above --divergence_bpc or NaN, or too many skipped updates in a row.
    The loss is the global mean, so every rank decides the same."""
    if cfg.divergence_bpc and not loss / LN2 <= cfg.divergence_bpc:  # also catches NaN
        raise Diverged(f"training diverged at step {step}: loss {loss / LN2:.4g} bits per character (limit "
                       f"--divergence_bpc={cfg.divergence_bpc:g}); nothing after the last checkpoint "
                       f"({progress.last_checkpoint or 'none'}) was saved; lower --learning_rate or --max_learning_rate")
    window.skipped_in_a_row = 0 if finite else window.skipped_in_a_row + 1
    if window.skipped_in_a_row >= cfg.max_skipped_steps:
        raise Diverged(f"the gradients were not finite for {window.skipped_in_a_row} updates in a row (step {step}); "
                       "lower --learning_rate, or use --precision=fp32 or mixed_bfloat16")
    window.loss += loss
    window.steps += 1


def save_milestones(job: Job, progress: Progress) -> None:
    """Each --milestone_chars the first time training has seen that many characters."""
    seen = int(job.state.chars_seen.numpy())
    for chars in job.cfg.milestone_chars:
        if seen - job.streams.chars_per_step < chars <= seen:
            job.checkpoints.save_milestone(chars, progress.train_bpc)


def report_progress(job: Job, progress: Progress, window: Window, step: int, norm: float, world: int) -> None:
    """The progress line and its TensorBoard scalars, over the steps since the last line."""
    cfg = job.cfg
    progress.train_bpc = train_bpc = window.loss / window.steps / LN2
    seconds = time.time() - window.started
    chars_per_s = window.steps * job.streams.chars_per_step / seconds
    eta = (cfg.train_steps - step) * seconds / window.steps
    if not dist.is_chief():
        return
    scale = float(job.optimizer.loss_scale) if modeldir.loss_scaled(cfg.precision) else 1.0
    print(f"[train] step {step}/{cfg.train_steps} loss {train_bpc * LN2:.4f} bpc {train_bpc:.4f} "
          f"lr {float(job.schedule(step - 1)):.3g} loss_scale {scale:g} grad_norm {norm:.3f} "
          f"skipped {int(job.state.skipped.numpy())} chars/s {chars_per_s:,.0f} "
          f"({chars_per_s / world:,.0f}/worker) eta {eta:,.0f}s", flush=True)
    with job.writer.as_default(step=step):
        tf.summary.scalar("train/bpc", train_bpc)
        tf.summary.scalar("train/grad_norm", norm)
        tf.summary.scalar("train/chars_per_second", chars_per_s)
        tf.summary.scalar("train/loss_scale", scale)


def evaluate(job: Job, progress: Progress, val_streams: ByteStreams, step: int, world: int) -> None:
    """Validation BPC over the fixed validation streams (a collective), into the history and TensorBoard."""
    progress.val_bpc = bpc = bits_per_char(job.model, val_streams, job.cfg.eval_windows, job.eval_step)
    progress.history.append({"step": step, "chars_seen": int(job.state.chars_seen.numpy()), "val_bpc": bpc,
                             "train_bpc": progress.train_bpc, "world_size": world})
    if dist.is_chief():
        print(f"[eval] step {step} validation bpc {bpc:.4f}", flush=True)
        with job.writer.as_default(step=step):
            tf.summary.scalar("val/bpc", bpc)


def save_checkpoint(job: Job, progress: Progress, rank: int, rows: int, stopping: bool, elastic,
                    world_steps: dict) -> None:
    """Checkpoints every --checkpoint_every steps, at the end and when stopping; under elastic also
    commits every --commit_every steps. The previous commit's RNN state is removed only after the new
    commit, so a worker lost during this checkpoint still has a commit to roll back to."""
    cfg, step = job.cfg, job.state.current_step
    committing = elastic and (step % cfg.commit_every == 0 or step == cfg.train_steps or stopping)
    if step % cfg.checkpoint_every == 0 or step == cfg.train_steps or stopping:
        keep = (progress.last_commit, step) if committing else (progress.last_commit,)
        progress.last_checkpoint = job.checkpoints.save(rank, rows, keep=keep)
    elif committing:
        job.checkpoints.save_state(rank, rows)  # the state files of this step are what a rollback reads
    if committing:
        elastic.world_steps = dict(world_steps)
        elastic.commit()  # a lost worker rolls every rank back to here
        progress.last_commit = step
        if dist.is_chief():
            job.checkpoints.manager.prune_states(also_keep=(step,))


# ---------------------------------------------------------------- summary

def write_summary(job: Job, progress: Progress, steps_this_run: int) -> dict:
    """MODEL_DIR/summary.json (rank 0) and the last line; every rank returns the summary."""
    cfg, state = job.cfg, job.state
    summary = {
        "final_step": state.current_step,
        "train_steps": cfg.train_steps,
        "stopped_early": progress.stopped,
        "steps_this_run": steps_this_run,
        "steps_at_world_size": {str(w): n for w, n in sorted(progress.world_steps.items())},
        "train_bpc": progress.train_bpc,
        "val_bpc": progress.val_bpc,
        "chars_seen": int(state.chars_seen.numpy()),
        "chars_per_second": steps_this_run * job.streams.chars_per_step / max(time.time() - progress.started, 1e-9),
        "skipped_steps": int(state.skipped.numpy()),
        "world_size": dist.size(),
        "global_batch": job.streams.train_rows,
        "peak_learning_rate": job.peak_lr,
        "gradient_reduction": cfg.gradient_reduction,
        "precision": cfg.precision,
        "replicas_in_sync": dist.replicas_identical(job.model.variables),
        "history": progress.history,
    }
    job.writer.flush()
    if dist.is_chief():
        files.write_json(os.path.join(cfg.model_dir, "summary.json"), summary)
        tensorboard = f"TensorBoard: tensorboard --logdir {os.path.join(cfg.model_dir, 'tensorboard')}"
        if progress.stopped:
            print(f"[train] stopped at step {summary['final_step']} ({progress.stopped}); checkpoint "
                  f"{progress.last_checkpoint} written; run the same command to resume. {tensorboard}", flush=True)
        else:
            print(f"[train] done: step {summary['final_step']}, validation bpc {summary['val_bpc']:.4f}, "
                  f"{summary['chars_per_second']:,.0f} chars/s. Checkpoints: {job.checkpoints.directory}  "
                  f"{tensorboard}", flush=True)
    return summary


# ---------------------------------------------------------------- command line

def main(argv):
    stopping.run_command(argv, "train", TrainConfig, start_horovod, run,
                         (DataError, CheckpointError, Diverged, ValueError, FileNotFoundError), memory_hint)


def start_horovod(cfg: TrainConfig) -> None:
    dist.init(cfg.intra_op_threads, cfg.inter_op_threads, cfg.fp16_allreduce, cfg.cycle_time_ms,
              cfg.gradient_reduction)


def memory_hint(cfg: TrainConfig) -> str:
    return (f"hidden {cfg.hidden_size}, {cfg.batch_size_per_worker} x {cfg.seq_length} per worker); lower "
            "--batch_size_per_worker or raise --backward_passes_per_step")


def entry():
    define_training()
    app.run(main)


if __name__ == "__main__":
    entry()
