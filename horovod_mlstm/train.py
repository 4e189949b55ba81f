"""Data-parallel mLSTM pretraining: one training loop, read top to bottom.

    horovodrun -np 2 -H localhost:2 python train.py --flagfile=configs/cpu_demo.cfg
    python train.py --flagfile=configs/cpu_demo.cfg          # one process, same code

Sections: config -> input -> model and optimizer -> update step -> checkpoint/resume ->
loop (progress, validation, TensorBoard, summary.json). Horovod is only touched through
horovod_mlstm.distributed. A job restarted with the same --model_dir resumes where it stopped,
on any number of ranks that divides its global batch.

Stopping early: SIGTERM, SIGUSR1 or SIGINT (what a scheduler sends before a time limit or
preemption, or Ctrl-C), or --max_runtime_minutes, make every rank stop after the same step
(the request rides along with each step's allreduce), checkpoint, and exit with status 75
(EXIT_STOPPED); the same command resumes. A diverging loss stops the job with an error
before a checkpoint of it is written.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, logging

from horovod_mlstm import checkpoint as ckpt_files
from horovod_mlstm import corpus, data, distributed as dist
from horovod_mlstm import flags as hflags
from horovod_mlstm import kernels, stallwatch
from horovod_mlstm.checkpoint import CheckpointError, CheckpointMismatch, Checkpointer
from horovod_mlstm.metrics import LN2, bits_per_char, make_eval_step, xent
from horovod_mlstm.model import ModelConfig, build_model
from horovod_mlstm.records import DataError
from horovod_mlstm.schedule import WarmupDecaySchedule

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early and checkpointed; run the same command to resume


class Diverged(Exception):
    """The loss blew up; the job stops before writing a checkpoint of it."""


class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGINT or the wall-clock limit; each rank votes it into every step.

    A second Ctrl-C aborts at once (Python's default), without the checkpoint.
    """

    def __init__(self, max_minutes: float):
        self.reason = None
        self.deadline = time.time() + 60 * max_minutes if max_minutes else None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.reason = self.reason or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def vote(self) -> float:
        if self.reason is None and self.deadline and time.time() > self.deadline:
            self.reason = "--max_runtime_minutes"
        return 1.0 if self.reason else 0.0


def make_update(model, optimizer, micro_batches: int = 1, clip_norm: float = 0.0, xla: bool = False):
    """The update step: update(inputs, targets, h, c, stop_vote) -> (loss, grad_norm, finite, votes, h, c).

    The rank's streams are split into `micro_batches` whose gradients are summed; one fused
    ring-allreduce averages them over ranks (or Adasum combines them: --gradient_reduction);
    the combined, unscaled gradients are clipped to `clip_norm` (0 = off) and applied, unless
    one is not finite (then the update is skipped, as loss scaling does). The global mean loss
    and the ranks' stop votes are allreduced with the gradients, so every rank takes the same
    decision after the step.
    """
    variables = model.trainable_variables
    loss_scaling = isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)

    @tf.function(jit_compile=xla or None)
    def local_gradients(inputs, targets, h, c):
        """Loss and this rank's gradients for one micro-batch (XLA-compiled with --xla)."""
        with tf.GradientTape() as tape:
            logits, (h, c) = model(inputs, (h, c))
            loss = tf.reduce_mean(xent(targets, logits))
            scaled = optimizer.get_scaled_loss(loss) if loss_scaling else loss
        # Dense embedding gradients (256 x embed is tiny): they add across micro-batches and
        # allreduce as one fused buffer, like DistributedGradientTape(sparse_as_dense=True).
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(scaled, variables)]
        return loss, grads, h, c

    @tf.function
    def apply(grads, loss, stop_vote):
        # Enqueued with the gradients (same Horovod cycle): the global loss and the stop votes.
        with tf.control_dependencies(grads):
            loss, votes = tf.unstack(dist.mean(tf.stack([loss, stop_vote])))
        grads = dist.allreduce_gradients([g / micro_batches for g in grads] if micro_batches > 1 else grads)
        if loss_scaling:
            grads = optimizer.get_unscaled_gradients(grads)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        if clip_norm:
            grads, norm = tf.clip_by_global_norm(grads, clip_norm)
        else:
            norm = tf.linalg.global_norm(grads)
        if loss_scaling:
            optimizer.apply_gradients(zip(grads, variables))  # skips the update itself when not finite
        else:
            tf.cond(finite, lambda: optimizer.apply_gradients(zip(grads, variables)), lambda: optimizer.iterations)
        return loss, norm, finite, votes

    def update(inputs, targets, h, c, stop_vote):
        # Micro-batches run one after another from Python: inside one graph TensorFlow runs them side
        # by side and holds all their activations at once, so accumulation would not save memory.
        micro = inputs.shape[0] // micro_batches
        grads, losses, new_h, new_c = None, [], [], []
        for j in range(micro_batches):
            rows = slice(j * micro, (j + 1) * micro)
            loss, g, h_j, c_j = local_gradients(inputs[rows], targets[rows], h[rows], c[rows])
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            losses.append(loss)
            new_h.append(h_j)
            new_c.append(c_j)
        loss, norm, finite, votes = apply(grads, tf.reduce_mean(tf.stack(losses)), tf.cast(stop_vote, tf.float32))
        return loss, norm, finite, votes, tf.concat(new_h, 0), tf.concat(new_c, 0)

    return update


def check_model_dir(cfg: hflags.TrainConfig, model_config: ModelConfig) -> None:
    """A model_dir holding a different architecture is an error, not something to overwrite."""
    if os.path.exists(os.path.join(cfg.model_dir, "config.json")):
        saved = ModelConfig.load(cfg.model_dir)
        if saved != model_config:
            raise ValueError(f"--model_dir {cfg.model_dir} holds a different model ({saved}); "
                             f"the flags ask for {model_config}. Use another --model_dir.")
    try:
        os.makedirs(cfg.model_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --model_dir {cfg.model_dir}: {e.strerror}") from None
    if not os.access(cfg.model_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--model_dir {cfg.model_dir} is not writable")


def strict_json(value):
    """NaN and infinities as null, so summary.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return value


def run(cfg: hflags.TrainConfig, stop: StopRequest) -> dict | None:
    """Trains to --train_steps; returns the summary (None when there was nothing left to train)."""
    tf.keras.utils.set_random_seed(cfg.seed)
    model_config = cfg.model_config()
    start_world = dist.size()
    # The job's streams: rows_per_worker per rank at start. The global batch stays fixed for
    # the job (elastic resets and restarts on another number of ranks keep it).
    total_rows = cfg.rows_per_worker * start_world
    # Validation streams, likewise fixed; --eval_batch_size keeps them the same across runs with
    # different batches, so their validation BPC compares.
    total_val_rows = (cfg.eval_batch_size or cfg.batch_size_per_worker) * start_world
    k, L, H = cfg.backward_passes_per_step, cfg.seq_length, cfg.hidden_size

    # ---------------------------------------------------------------- input
    # Checked on every rank before any collective, so a bad data dir is one line from each.
    if not cfg.data_dir:
        corpus.prepare_builtin(cfg.data_path)  # atomic: safe for every rank to call at once
    data.check_split(cfg.data_path, "train", total_rows, L)
    data.check_split(cfg.data_path, "val", total_val_rows, L)

    def input_streams(rank: int, world: int):
        """(train, validation) streams of this rank: its slice of one world-independent layout."""
        rows = total_rows // world
        val_first, val_end = rank * total_val_rows // world, (rank + 1) * total_val_rows // world
        return (data.split_streams(cfg.data_path, "train", total_rows, L, rank * rows, rows),
                data.split_streams(cfg.data_path, "val", total_val_rows, L, val_first, val_end - val_first))

    # ----------------------------------------------------- model and optimizer
    model = build_model(model_config)
    peak_lr = cfg.peak_lr(start_world)
    schedule = WarmupDecaySchedule(peak_lr, cfg.warmup_steps, cfg.horizon, cfg.lr_decay)
    optimizer = tf.keras.optimizers.Adam(schedule, beta_1=cfg.adam_beta1, beta_2=cfg.adam_beta2,
                                         epsilon=cfg.adam_epsilon)
    loss_scaling = cfg.precision == "mixed_float16"
    if loss_scaling:
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)  # dynamic loss scale
    optimizer.build(model.trainable_variables)

    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    position = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_position")
    skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
    chars_seen = tf.Variable(0, dtype=tf.int64, trainable=False, name="chars_seen")
    streams = tf.Variable(total_rows, dtype=tf.int64, trainable=False, name="streams")
    # This rank's RNN state; its row count follows the world size. Checkpoints keep it per rank.
    state_h = tf.Variable(tf.zeros([0, H]), shape=[None, H], trainable=False, name="state_h")
    state_c = tf.Variable(tf.zeros([0, H]), shape=[None, H], trainable=False, name="state_c")
    synced = model.variables + optimizer.variables + [step, position, skipped, chars_seen]

    # ---------------------------------------------------------- update step
    update = make_update(model, optimizer, k, cfg.clip_norm, cfg.xla)

    def train_step(inputs, targets, reset, stop_vote):
        keep = tf.cast(tf.logical_not(reset), tf.float32)  # zero the state where the streams restart
        loss, norm, finite, votes, h, c = update(inputs, targets, state_h * keep, state_c * keep, stop_vote)
        skipped.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
        state_h.assign(h)
        state_c.assign(c)
        step.assign_add(1)
        position.assign_add(1)
        return loss, norm, finite, votes

    eval_step = make_eval_step(model)

    # ------------------------------------------------- checkpoint and resume
    ckpt = Checkpointer(cfg.model_dir, cfg.keep_checkpoints, writer=dist.is_chief(), model=model,
                        optimizer=optimizer, step=step, position=position, skipped=skipped,
                        chars_seen=chars_seen, streams=streams)

    def usable(path: str) -> None:
        """A checkpoint is used only if it has this job's streams and all of their RNN state."""
        saved = tf.train.load_checkpoint(path).get_tensor("streams/.ATTRIBUTES/VARIABLE_VALUE")
        if saved != total_rows:
            raise CheckpointMismatch(
                f"the checkpoint {path} carries {saved} streams but this job has {total_rows} (ranks x "
                "batch_size_per_worker x backward_passes_per_step); restart with the same global batch, or use "
                "another --model_dir")
        ckpt_files.check_state(ckpt.directory, ckpt_files.step_of(path), total_rows, H)

    restored, history, error = None, [], None
    if dist.is_chief():  # rank 0 restores; the broadcast before the first step gives every rank its state
        try:
            check_model_dir(cfg, model_config)
            model_config.save(cfg.model_dir)
            restored = ckpt.restore(check=usable)
            if restored and os.path.exists(os.path.join(cfg.model_dir, "summary.json")):
                with open(os.path.join(cfg.model_dir, "summary.json")) as f:
                    history = [h for h in json.load(f).get("history", []) if h["step"] <= step.numpy()]
        except (CheckpointError, ValueError, OSError) as e:
            error = e
    if cfg.elastic and error:
        raise error  # no collective before the elastic loop: a worker joining later would never meet it
    if not cfg.elastic:
        dist.agree(error)
    watch = None if cfg.elastic else stallwatch.watch(cfg.model_dir, dist.rank(), dist.size())

    def load_state(rank: int, rows: int) -> None:
        """This rank's rows of every stream's state at the current step (zeros at step 0)."""
        s = int(step.numpy())
        h, c = (ckpt_files.load_state_rows(ckpt.directory, s, rank * rows, rows, H) if s
                else (np.zeros([rows, H], np.float32),) * 2)
        state_h.assign(h)
        state_c.assign(c)

    def save_state(rank: int, rows: int, s: int) -> None:
        """Every rank writes its rows of the state at step s (a collective; all ranks call it)."""
        if dist.is_chief():
            ckpt_files.clear_state(ckpt.directory, s)
        dist.barrier()
        error = None
        try:
            ckpt_files.save_state_rows(ckpt.directory, s, rank * rows, state_h.numpy(), state_c.numpy())
        except OSError as e:
            error = CheckpointError(f"rank {rank} cannot write its RNN state to "
                                    f"{ckpt_files.state_dir(ckpt.directory, s)}: {e.strerror}")
        dist.agree(error)

    def save_checkpoint(rank: int, rows: int, last_commit: int | None = None) -> None:
        """RNN state from every rank, then rank 0 writes the model and optimizer (a collective)."""
        s = int(step.numpy())
        save_state(rank, rows, s)
        error = None
        if dist.is_chief():
            try:
                if not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in model.variables):
                    raise Diverged(f"the weights are not finite at step {s}; not checkpointing them "
                                   f"(the last good checkpoint stays in {ckpt.directory})")
                logging.info("checkpoint %s", ckpt.save(s))
                ckpt.prune_states(also_keep=last_commit)
            except (CheckpointError, Diverged) as e:
                error = e
        dist.agree(error)

    def save_milestone(chars: int, s: int) -> None:
        """The model alone, as a model dir of its own that evaluate and transfer read (rank 0)."""
        folder = os.path.join(cfg.model_dir, "milestones", f"chars-{chars}")
        os.makedirs(folder, exist_ok=True)
        model_config.save(folder)
        Checkpointer(folder, keep=1, model=model).save(s)
        with open(os.path.join(folder, "milestone.json"), "w") as f:
            json.dump({"milestone_chars": chars, "chars_seen": int(chars_seen.numpy()), "step": s,
                       "train_bpc": strict_json(log["train_bpc"])}, f, indent=2)

    # ----------------------------------------------------------------- loop
    writer = tf.summary.create_file_writer(os.path.join(cfg.model_dir, "tensorboard"))
    log = {"train_bpc": float("nan"), "val_bpc": float("nan"), "history": history, "world_steps": {},
           "stopped": None, "last_checkpoint": restored, "last_commit": None}

    def train_loop(elastic=None) -> dict:
        """Runs from the current step to --train_steps. Entered once, or again after each elastic reset."""
        rank, world, chief = dist.rank(), dist.size(), dist.is_chief()
        if total_rows % world:
            raise ValueError(f"{total_rows} streams do not divide over {world} ranks")
        rows = total_rows // world
        error, train_streams, val_streams = None, None, None
        try:
            train_streams, val_streams = input_streams(rank, world)
            load_state(rank, rows)
        except (DataError, CheckpointError) as e:
            error = e
        dist.agree(error)
        chars_per_step = total_rows * L
        start_step = int(step.numpy())
        log["last_commit"] = start_step if elastic else None  # where an elastic rollback returns to
        log.setdefault("first_step", start_step)
        log.setdefault("t_start", time.time())
        if start_step >= cfg.train_steps:
            return log
        if chief:
            print(f"[train] {world} rank(s) x {rows} streams x {L} bytes = global batch {total_rows} sequences "
                  f"({chars_per_step} chars/step); peak LR {peak_lr:.3g} ({cfg.batch_scaling} scaling); "
                  + ("Adasum gradient reduction; " if cfg.gradient_reduction == "adasum" else "")
                  + f"{cfg.precision}; hidden {H}; gate math: "
                  + ("TensorFlow ops (--xla)" if cfg.xla else kernels.status()) + "; "
                  + (f"resumed from {restored} at step {start_step}" if restored and not elastic
                     else f"continuing at step {start_step}" if start_step else "starting from scratch"),
                  flush=True)
        world_steps = dict(elastic.world_steps if elastic else log["world_steps"])
        window_loss, window_steps, skipped_in_a_row, t_last = 0.0, 0, 0, time.time()
        batches = iter(train_streams.dataset(int(position.numpy())))
        for _ in range(start_step, cfg.train_steps):
            batch = next(batches)
            loss, norm, finite, votes = train_step(batch["inputs"], batch["targets"], batch["reset"],
                                                   tf.constant(stop.vote()))
            chars_seen.assign_add(chars_per_step)
            world_steps[world] = world_steps.get(world, 0) + 1
            s, loss = int(step.numpy()), float(loss)
            if watch:
                watch.progress(s)
            # The loss is the global mean: every rank takes the same decision here.
            if cfg.divergence_bpc and not loss / LN2 <= cfg.divergence_bpc:  # also catches NaN
                raise Diverged(f"training diverged at step {s}: loss {loss / LN2:.4g} bits per character "
                               f"(limit --divergence_bpc={cfg.divergence_bpc:g}); nothing after the last checkpoint "
                               f"({log['last_checkpoint'] or 'none'}) was saved; lower --learning_rate or "
                               "--max_learning_rate")
            skipped_in_a_row = 0 if bool(finite) else skipped_in_a_row + 1
            if skipped_in_a_row >= cfg.max_skipped_steps:
                raise Diverged(f"the gradients were not finite for {skipped_in_a_row} updates in a row (step {s}); "
                               "lower --learning_rate, or use --precision=fp32 or mixed_bfloat16")
            if chief:
                with writer.as_default(step=s):
                    tf.summary.scalar("learning_rate", schedule(s - 1))
            seen = int(chars_seen.numpy())
            for m in cfg.milestone_chars:  # each the first time training has seen that many characters
                if seen - chars_per_step < m <= seen:
                    error = None
                    if chief:
                        try:
                            save_milestone(m, s)
                        except (CheckpointError, OSError) as e:
                            error = CheckpointError(f"cannot write the milestone at {m:,} characters: {e}")
                    dist.agree(error)
            window_loss += loss
            window_steps += 1

            if s % cfg.log_every == 0 or s == cfg.train_steps:
                log["train_bpc"] = train_bpc = window_loss / window_steps / LN2
                now = time.time()
                chars_per_s = window_steps * chars_per_step / (now - t_last)
                eta = (cfg.train_steps - s) * (now - t_last) / window_steps
                if chief:
                    scale = float(optimizer.loss_scale) if loss_scaling else 1.0
                    print(f"[train] step {s}/{cfg.train_steps} loss {train_bpc * LN2:.4f} bpc {train_bpc:.4f} "
                          f"lr {float(schedule(s - 1)):.3g} loss_scale {scale:g} grad_norm {float(norm):.3f} "
                          f"skipped {int(skipped.numpy())} chars/s {chars_per_s:,.0f} "
                          f"({chars_per_s / world:,.0f}/worker) eta {eta:,.0f}s", flush=True)
                    with writer.as_default(step=s):
                        tf.summary.scalar("train/bpc", train_bpc)
                        tf.summary.scalar("train/grad_norm", norm)
                        tf.summary.scalar("train/chars_per_second", chars_per_s)
                        tf.summary.scalar("train/loss_scale", scale)
                window_loss, window_steps, t_last = 0.0, 0, time.time()

            if (cfg.eval_every and s % cfg.eval_every == 0) or s == cfg.train_steps:
                log["val_bpc"] = val_bpc = bits_per_char(model, val_streams, cfg.eval_windows, eval_step)
                log["history"].append({"step": s, "chars_seen": int(chars_seen.numpy()), "val_bpc": val_bpc,
                                       "train_bpc": log["train_bpc"], "world_size": world})
                if chief:
                    print(f"[eval] step {s} validation bpc {val_bpc:.4f}", flush=True)
                    with writer.as_default(step=s):
                        tf.summary.scalar("val/bpc", val_bpc)
                t_last = time.time()

            stopping = float(votes) > 0
            committing = elastic and (s % cfg.commit_every == 0 or s == cfg.train_steps or stopping)
            if s % cfg.checkpoint_every == 0 or s == cfg.train_steps or stopping:
                save_checkpoint(rank, rows, last_commit=s if committing else log["last_commit"])
                log["last_checkpoint"] = os.path.join(ckpt.directory, f"ckpt-{s}")
            elif committing:
                save_state(rank, rows, s)  # the state files of step s are what a rollback reads
            if committing:
                elastic.world_steps = dict(world_steps)
                elastic.commit()  # a lost worker rolls every rank back to here
                log["last_commit"] = s
                if chief:
                    ckpt.prune_states(also_keep=s)
            if stopping:
                log["stopped"] = stop.reason or "another rank's request"
                break
        log["world_steps"] = world_steps
        return log

    if cfg.elastic:
        dist.run_elastic(train_loop, synced, world_steps={})
    else:
        dist.broadcast_variables(synced)  # rank 0's (restored or initial) state to every rank
        train_loop()
        if watch:
            watch.stop()
    steps_this_run = int(step.numpy()) - log["first_step"]
    if not steps_this_run:
        if dist.is_chief():
            print(f"[train] {cfg.model_dir} is already at step {int(step.numpy())} (--train_steps="
                  f"{cfg.train_steps}): nothing to train; its checkpoints and summary.json are unchanged. Raise "
                  "--train_steps to train further.", flush=True)
        return None

    in_sync = dist.replicas_agree(model.variables)
    summary = {
        "final_step": int(step.numpy()),
        "stopped_early": log["stopped"],
        "steps_this_run": steps_this_run,
        "steps_at_world_size": {str(w): n for w, n in sorted(log["world_steps"].items())},
        "train_bpc": log["train_bpc"],
        "val_bpc": log["val_bpc"],
        "chars_seen": int(chars_seen.numpy()),
        "chars_per_second": steps_this_run * total_rows * L / max(time.time() - log["t_start"], 1e-9),
        "skipped_steps": int(skipped.numpy()),
        "world_size": dist.size(),
        "global_batch": total_rows,
        "peak_learning_rate": peak_lr,
        "gradient_reduction": cfg.gradient_reduction,
        "precision": cfg.precision,
        "replicas_in_sync": in_sync,
        "history": log["history"],
    }
    writer.flush()
    if dist.is_chief():
        path = os.path.join(cfg.model_dir, "summary.json")
        with open(path + ".tmp", "w") as f:
            json.dump(strict_json(summary), f, indent=2, allow_nan=False)
        os.replace(path + ".tmp", path)
        tensorboard = f"TensorBoard: tensorboard --logdir {os.path.join(cfg.model_dir, 'tensorboard')}"
        if log["stopped"]:
            print(f"[train] stopped at step {summary['final_step']} ({log['stopped']}); checkpoint "
                  f"{log['last_checkpoint']} written; run the same command to resume. {tensorboard}", flush=True)
        else:
            print(f"[train] done: step {summary['final_step']}, validation bpc {summary['val_bpc']:.4f}, "
                  f"{summary['chars_per_second']:,.0f} chars/s. Checkpoints: {ckpt.directory}  {tensorboard}",
                  flush=True)
    return summary


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]} (flags are --name=value)")
    try:
        cfg = hflags.TrainConfig.from_flags()
    except ValueError as e:
        sys.exit(f"error: {e}")
    stop = StopRequest(cfg.max_runtime_minutes)
    try:  # every rank refuses a reduction its launcher cannot run, with the same line
        dist.init(cfg.intra_op_threads, cfg.inter_op_threads, cfg.fp16_allreduce, cfg.cycle_time_ms,
                  cfg.gradient_reduction)
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        summary = run(cfg, stop)
    except (DataError, CheckpointError, Diverged, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C: abort without the checkpoint
        print("error: interrupted twice: stopped without checkpointing this step; the last checkpoint is intact "
              "and the same command resumes from it", file=sys.stderr)
        sys.exit(130)
    except tf.errors.UnknownError as e:
        if "Horovod has been shut down" not in e.message:
            raise
        sys.exit("error: Horovod shut the job down (a rank stalled past the stall shutdown time, left or failed; "
                 "Horovod's lines above say which); the last checkpoint is intact and the same command resumes")
    except (MemoryError, tf.errors.ResourceExhaustedError):
        sys.exit(f"error: out of memory (hidden {cfg.hidden_size}, {cfg.batch_size_per_worker} x {cfg.seq_length} "
                 "per worker); lower --batch_size_per_worker or raise --backward_passes_per_step")
    if summary and summary["stopped_early"]:
        # Everything is on disk. Skip the interpreter's teardown (seconds for TensorFlow on a busy host):
        # horovodrun kills its ranks 5 s after it got the SIGTERM.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_STOPPED)


def entry():
    hflags.define_training()
    app.run(main)


if __name__ == "__main__":
    entry()
