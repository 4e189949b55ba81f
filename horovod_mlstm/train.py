"""Data-parallel mLSTM pretraining: one training loop, read top to bottom.

    horovodrun -np 2 -H localhost:2 python train.py --flagfile=configs/cpu_demo.cfg
    python train.py --flagfile=configs/cpu_demo.cfg          # one process, same code

Sections: config -> input -> model and optimizer -> update step -> checkpoint/resume ->
loop (progress, validation, TensorBoard, summary.json). Horovod is only touched through
horovod_mlstm.distributed. A job restarted with the same --model_dir resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
import time

import tensorflow as tf
from absl import app, logging

from horovod_mlstm import data, distributed as dist
from horovod_mlstm import flags as hflags
from horovod_mlstm.checkpoint import CheckpointError, Checkpointer
from horovod_mlstm.evaluate import LN2, bits_per_char, make_eval_step, xent
from horovod_mlstm.model import ModelConfig, build_model
from horovod_mlstm.preprocess import prepare_builtin
from horovod_mlstm.schedule import WarmupDecaySchedule

def check_model_dir(cfg: hflags.TrainConfig, model_config: ModelConfig) -> None:
    """A model_dir holding a different architecture is an error, not something to overwrite."""
    if os.path.exists(os.path.join(cfg.model_dir, "config.json")):
        saved = ModelConfig.load(cfg.model_dir)
        if saved != model_config:
            raise ValueError(f"--model_dir {cfg.model_dir} holds a different model ({saved}); "
                             f"the flags ask for {model_config}. Use another --model_dir.")


def run(cfg: hflags.TrainConfig) -> dict:
    tf.keras.utils.set_random_seed(cfg.seed)
    model_config = cfg.model_config()
    check_model_dir(cfg, model_config)
    start_world = dist.size()
    # The job's streams: rows_per_worker per rank at start. An elastic job keeps this global
    # batch when ranks come and go; each rank then carries total_rows / world of them.
    total_rows = cfg.rows_per_worker * start_world
    # Validation streams, likewise fixed for the job; --eval_batch_size keeps them the same
    # across runs with different batches, so their validation BPC compares.
    total_val_rows = (cfg.eval_batch_size or cfg.batch_size_per_worker) * start_world
    k, L, H = cfg.backward_passes_per_step, cfg.seq_length, cfg.hidden_size

    # ---------------------------------------------------------------- input
    if not cfg.data_dir:
        prepare_builtin(cfg.data_path)  # atomic: safe for every rank to call at once

    def input_streams(rank: int, world: int):
        """(train, validation) byte streams of this rank for the current world size."""
        rows, val_rows = total_rows // world, total_val_rows // world
        if cfg.elastic:  # streams laid out over the whole split, so ranks can be reassigned
            return (data.global_streams(cfg.data_path, "train", total_rows, L, rank * rows, rows),
                    data.global_streams(cfg.data_path, "val", val_rows * world, L, rank * val_rows, val_rows))
        return (data.rank_streams(cfg.data_path, "train", rows, L, rank, world),
                data.rank_streams(cfg.data_path, "val", val_rows, L, rank, world))

    # ----------------------------------------------------- model and optimizer
    model = build_model(model_config)
    variables = model.trainable_variables
    peak_lr = cfg.peak_lr(start_world)
    schedule = WarmupDecaySchedule(peak_lr, cfg.warmup_steps, cfg.horizon, cfg.lr_decay)
    optimizer = tf.keras.optimizers.Adam(schedule, beta_1=cfg.adam_beta1, beta_2=cfg.adam_beta2,
                                         epsilon=cfg.adam_epsilon)
    loss_scaling = cfg.precision == "mixed_float16"
    if loss_scaling:
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)  # dynamic loss scale
    optimizer.build(variables)

    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    position = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_position")
    skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps")
    chars_seen = tf.Variable(0, dtype=tf.int64, trainable=False, name="chars_seen")
    # This rank's RNN state (its row count follows the world size) ...
    state_h = tf.Variable(tf.zeros([0, H]), shape=[None, H], trainable=False, name="state_h")
    state_c = tf.Variable(tf.zeros([0, H]), shape=[None, H], trainable=False, name="state_c")
    # ... and every stream's, gathered in rank order for checkpoints and elastic commits.
    all_h = tf.Variable(tf.zeros([total_rows, H]), trainable=False, name="all_h")
    all_c = tf.Variable(tf.zeros([total_rows, H]), trainable=False, name="all_c")
    synced = model.variables + optimizer.variables + [step, position, skipped, chars_seen, all_h, all_c]

    # ---------------------------------------------------------- update step
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

    local_gradients = tf.function(local_gradients, jit_compile=cfg.xla or None)

    @tf.function
    def train_step(inputs, targets, reset):
        keep = tf.cast(tf.logical_not(reset), tf.float32)  # zero the state where the streams restart
        h_all, c_all = state_h * keep, state_c * keep
        micro = inputs.shape[0] // k
        grads, losses, new_h, new_c = None, [], [], []
        for j in range(k):  # micro-batch j: rows [j*micro, (j+1)*micro) of this rank's streams
            rows_j = slice(j * micro, (j + 1) * micro)
            loss, g, h, c = local_gradients(inputs[rows_j], targets[rows_j], h_all[rows_j], c_all[rows_j])
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            losses.append(loss)
            new_h.append(h)
            new_c.append(c)
        # One ring-allreduce per update, averaging over ranks (and micro-batches).
        grads = dist.allreduce_gradients([g / k for g in grads] if k > 1 else grads)
        if loss_scaling:
            grads = optimizer.get_unscaled_gradients(grads)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        if cfg.clip_norm:
            grads, norm = tf.clip_by_global_norm(grads, cfg.clip_norm)
        else:
            norm = tf.linalg.global_norm(grads)
        if loss_scaling:
            optimizer.apply_gradients(zip(grads, variables))  # skips the update itself when not finite
        else:
            tf.cond(finite, lambda: optimizer.apply_gradients(zip(grads, variables)),
                    lambda: optimizer.iterations)
        skipped.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
        state_h.assign(tf.concat(new_h, 0))
        state_c.assign(tf.concat(new_c, 0))
        step.assign_add(1)
        position.assign_add(1)
        return tf.reduce_mean(tf.stack(losses)), norm

    eval_step = make_eval_step(model)

    # ------------------------------------------------- checkpoint and resume
    ckpt = Checkpointer(cfg.model_dir, cfg.keep_checkpoints, model=model, optimizer=optimizer, step=step,
                        position=position, skipped=skipped, chars_seen=chars_seen, all_h=all_h, all_c=all_c)
    restored = None
    if dist.is_chief():
        os.makedirs(cfg.model_dir, exist_ok=True)
        model_config.save(cfg.model_dir)
        saved_rows = ckpt.saved_shape("all_h")
        if saved_rows and saved_rows[0] != total_rows:
            raise ValueError(f"the checkpoint in {cfg.model_dir} carries {saved_rows[0]} streams but this job has "
                             f"{total_rows} (ranks x batch_size_per_worker x backward_passes_per_step); restart "
                             "with the same global batch, or use another --model_dir")
        restored = ckpt.restore()

    def gather_state():
        """Every rank's RNN state into all_h/all_c (a collective: all ranks call it)."""
        all_h.assign(dist.gather(state_h))
        all_c.assign(dist.gather(state_c))

    def save_checkpoint():
        gather_state()
        if dist.is_chief():
            logging.info("checkpoint %s", ckpt.save(int(step.numpy())))

    # ----------------------------------------------------------------- loop
    writer = tf.summary.create_file_writer(os.path.join(cfg.model_dir, "tensorboard"))
    log = {"train_bpc": float("nan"), "val_bpc": float("nan"), "history": [], "world_steps": {}}

    def train_loop(elastic=None) -> dict:
        """Runs from the current step to --train_steps. Entered once, or again after each elastic reset."""
        rank, world, chief = dist.rank(), dist.size(), dist.is_chief()
        if total_rows % world:
            raise ValueError(f"{total_rows} streams do not divide over {world} ranks")
        rows = total_rows // world
        train_streams, val_streams = input_streams(rank, world)
        state_h.assign(all_h[rank * rows:(rank + 1) * rows])
        state_c.assign(all_c[rank * rows:(rank + 1) * rows])
        chars_per_step = total_rows * L
        start_step = int(step.numpy())
        if chief:
            print(f"[train] {world} rank(s) x {rows} streams x {L} bytes = global batch {total_rows} sequences "
                  f"({chars_per_step} chars/step); peak LR {peak_lr:.3g} ({cfg.batch_scaling} scaling); "
                  f"{cfg.precision}; hidden {H}; "
                  + (f"resumed from {restored} at step {start_step}" if restored and not elastic
                     else f"continuing at step {start_step}" if start_step else "starting from scratch"),
                  flush=True)
        world_steps = dict(elastic.world_steps if elastic else log["world_steps"])
        window_loss, window_steps, t_start = 0.0, 0, time.time()
        t_last = t_start
        batches = iter(train_streams.dataset(int(position.numpy())))
        for _ in range(start_step, cfg.train_steps):
            batch = next(batches)
            loss, norm = train_step(batch["inputs"], batch["targets"], batch["reset"])
            chars_seen.assign_add(chars_per_step)
            world_steps[world] = world_steps.get(world, 0) + 1
            s = int(step.numpy())
            if chief:
                with writer.as_default(step=s):
                    tf.summary.scalar("learning_rate", schedule(s - 1))
            window_loss += float(loss)
            window_steps += 1

            if s % cfg.log_every == 0 or s == cfg.train_steps:
                log["train_bpc"] = train_bpc = float(dist.mean(window_loss / window_steps)) / LN2
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

            if s % cfg.checkpoint_every == 0 or s == cfg.train_steps:
                save_checkpoint()
            if elastic and (s % cfg.commit_every == 0 or s == cfg.train_steps):
                gather_state()
                elastic.world_steps = dict(world_steps)
                elastic.commit()  # a lost worker rolls every rank back to here
        log["world_steps"] = world_steps
        log["seconds"] = time.time() - t_start
        log["steps_this_run"] = cfg.train_steps - start_step
        return log

    if cfg.elastic:
        dist.run_elastic(train_loop, synced, world_steps={})
    else:
        dist.broadcast_variables(synced)  # rank 0's (restored or initial) state to every rank
        train_loop()

    in_sync = dist.replicas_agree(model.variables)
    summary = {
        "final_step": int(step.numpy()),
        "steps_this_run": log["steps_this_run"],
        "steps_at_world_size": {str(w): n for w, n in sorted(log["world_steps"].items())},
        "train_bpc": log["train_bpc"],
        "val_bpc": log["val_bpc"],
        "chars_seen": int(chars_seen.numpy()),
        "chars_per_second": log["steps_this_run"] * total_rows * L / max(log["seconds"], 1e-9),
        "skipped_steps": int(skipped.numpy()),
        "world_size": dist.size(),
        "global_batch": total_rows,
        "peak_learning_rate": peak_lr,
        "precision": cfg.precision,
        "replicas_in_sync": in_sync,
        "history": log["history"],
    }
    if dist.is_chief():
        with open(os.path.join(cfg.model_dir, "summary.json.tmp"), "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(os.path.join(cfg.model_dir, "summary.json.tmp"), os.path.join(cfg.model_dir, "summary.json"))
        print(f"[train] done: step {summary['final_step']}, validation bpc {summary['val_bpc']:.4f}, "
              f"{summary['chars_per_second']:,.0f} chars/s. Checkpoints: {ckpt.directory}  "
              f"TensorBoard: tensorboard --logdir {os.path.join(cfg.model_dir, 'tensorboard')}", flush=True)
    return summary


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]} (flags are --name=value)")
    try:
        cfg = hflags.TrainConfig.from_flags()
    except ValueError as e:
        sys.exit(f"error: {e}")
    dist.init(cfg.intra_op_threads, cfg.inter_op_threads, cfg.fp16_allreduce, cfg.cycle_time_ms)
    try:
        run(cfg)
    except (data.DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def entry():
    hflags.define_training()
    app.run(main)


if __name__ == "__main__":
    entry()
