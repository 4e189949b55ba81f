"""Fine-tuning: a pretrained mLSTM and a classifier head trained together on a labelled task.

    python -m horovod_mlstm.finetune --model_dir PRETRAINED --output_dir OUT \
        --train train.csv --val dev.csv --test test.csv [--text_column sentence --label_column label] \
        [--imdb_dir D instead: the transfer suite's seeded IMDB subsample] [--text_prep project|radford] \
        [--readout mean_hidden|max_hidden|final_hidden|concat_hidden] [--aux_lm_weight 0.5] \
        [--pretrained_lr_multiplier 0.1] ...
    horovodrun -np 2 -H localhost:2 python -m horovod_mlstm.finetune ...      # same result, data parallel

Where the linear probe (transfer.py) fits a classifier on frozen features, this trains every weight
(Howard & Ruder 2018; NVIDIA's sentiment-discovery): a linear head over a pooled readout of the
hidden states (the final one, their mean or their max over the text's bytes, or the three side by
side), with dropout, on top of the pretrained mLSTM, whose weights learn at --pretrained_lr_multiplier
times the head's rate. An auxiliary next-byte loss on the same texts, weighted by --aux_lm_weight
(0 = off), keeps the language model in the objective. Validation accuracy after each epoch (or
--eval_every steps) keeps the best model and stops the job after --patience evaluations without a
better one; the test set is scored once, at the end, with the kept model.

Output, so that classify applies the result like a transfer classifier:
    OUT/model/                   the kept fine-tuned mLSTM, a model dir (modeldir.write_model)
    OUT/classifier.{json,npz}    its head as a classifier.Classifier naming the readout; mean and scale
                                 standardise the readout as the head does (FineTuner)
    OUT/summary.json             the validation curve, the kept step, the test accuracy
    OUT/checkpoints/, OUT/tensorboard/, OUT/settings.json   resuming and progress
    python -m horovod_mlstm.classify --model_dir OUT/model --classifier OUT --input ... --output ...

`run()` reads like train.py's: input -> model, head and optimizers -> update step -> checkpoint and
resume -> loop -> test and summary. Texts are padded at their end, so the fast unmasked recurrence
(model.py's hand-written backward) gives each text's hidden states unchanged; the readout gathers
and pools over its real bytes only. Training texts are cut to their first --max_bytes bytes (the
default, 1,024, cuts 46% of IMDB's 25,000 training reviews and keeps 65% of their bytes; no SST
sentence is longer than 255 bytes); validation, test and classify read whole texts, through
inference.Featurizer.

Data parallel as train.py, through distributed.py and update.py: one fixed --global_batch of texts
per step, the same on any number of ranks that divides it, each rank taking its slice; losses are
means over the global batch (each text and each byte weighted by one over the global count), and
dropout masks depend on the step and the text's row in the global batch, not on the rank, so 2 ranks
train the same model as 1. Batches are drawn by length (texts shuffled by seed and epoch, sorted in
pools of POOL_BATCHES batches, the batches shuffled) so that padding stays small; any rank and any
resumed run compute the same batches from the step alone. SIGTERM/SIGUSR1/SIGINT or
--max_runtime_minutes checkpoint and exit 75 (stopping.py), and the same command resumes; after
kill -9 it resumes from the last checkpoint. One job per output dir (modeldir.Lock).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np
import tensorflow as tf
from absl import app

from horovod_mlstm import distributed as dist
from horovod_mlstm import files, kernels, modeldir, stopping
from horovod_mlstm.checkpoint import CheckpointError, Checkpointer
from horovod_mlstm.classifier import Classifier
from horovod_mlstm.flags import AT_LEAST_1, NON_NEGATIVE, POSITIVE, CommonConfig, define, precision_setting, setting
from horovod_mlstm.inference import CONCAT, CONCAT_PARTS, TEXT_PREPS, Featurizer, encode, readout_width
from horovod_mlstm.metrics import xent
from horovod_mlstm.schedule import DECAYS, WarmupDecaySchedule
from horovod_mlstm.stopping import StopRequest
from horovod_mlstm.tasks import Split, Task, csv_task, load_imdb
from horovod_mlstm.update import make_update

HEAD_READOUTS = ("mean_hidden", "max_hidden", "final_hidden", CONCAT)  # inference.READOUTS the hidden states give
POOL_BATCHES = 50  # texts sorted by length together: this many global batches' worth
SETTINGS = "settings.json"
RUN_CONTROL = ("intra_op_threads", "inter_op_threads", "cycle_time_ms", "log_every", "checkpoint_every",
               "keep_checkpoints", "max_runtime_minutes")  # may change when a job resumes


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(CommonConfig):
    """finetune's settings: the task, the head, the objective, the optimizer and the loop.

    From CommonConfig: --model_dir is the pretrained model; --batch_size_per_worker and --seq_length
    are the featuriser's batch and chunk for validation and test (as classify's).
    """

    output_dir: str = setting("", "Where the fine-tuned model (OUTPUT_DIR/model), its classifier "
                              "(OUTPUT_DIR/classifier.json, read by classify), checkpoints and summary.json go.")
    # The task.
    train: str = setting("", "CSV of training texts and labels.")
    val: str = setting("", "CSV of validation texts: early stopping and the model kept.")
    test: str = setting("", "CSV of test texts, scored once at the end with the model kept.")
    text_column: str = setting("sentence", "CSV column holding the text.")
    label_column: str = setting("label", "CSV column holding the label (two or more classes).")
    encoding: str = setting("utf-8-sig", "CSV encoding (utf-8-sig reads UTF-8 with or without a BOM).")
    imdb_dir: str = setting("", "Instead of --train/--val/--test: IMDB's train.csv.gz and test.csv.gz, in the "
                            "transfer suite's seeded stratified subsample (tasks.load_imdb, seeded by --seed).")
    imdb_train: int = setting(2000, "IMDB training reviews (from train.csv.gz).", AT_LEAST_1)
    imdb_val: int = setting(1000, "IMDB validation reviews (the next ones of train.csv.gz).", AT_LEAST_1)
    imdb_test: int = setting(2000, "IMDB test reviews (from test.csv.gz).", AT_LEAST_1)
    final_imdb_test: int = setting(0, "Also score the model kept on the first N reviews of test.csv.gz in the same "
                                   "order (25000 = all); 0 = only --imdb_test.", NON_NEGATIVE)
    text_prep: str = setting("project", "How a text becomes bytes (inference.TEXT_PREPS), as in transfer.",
                             choices=tuple(TEXT_PREPS))
    max_bytes: int = setting(1024, "Training texts are cut to their first N bytes (after the text prep); "
                             "validation, test and classify read whole texts.", AT_LEAST_1)
    # The head and the objective.
    readout: str = setting("mean_hidden", "What the head reads: the mean or max of the hidden states over the "
                           "text's bytes, the last one, or concat_hidden: the last, mean and max side by side "
                           "(3 x hidden units).", choices=HEAD_READOUTS)
    dropout: float = setting(0.1, "Dropout on the readout, in [0, 1).", NON_NEGATIVE)
    aux_lm_weight: float = setting(0.0, "Weight of the auxiliary next-byte loss (mean nats per byte of the same "
                                   "texts) added to the classification loss; 0 = off.", NON_NEGATIVE)
    # The optimizer.
    global_batch: int = setting(32, "Texts per update, over all ranks (fixed: ranks x backward_passes_per_step "
                                "must divide it).", AT_LEAST_1)
    backward_passes_per_step: int = setting(1, "Micro-batches per rank accumulated into one update.", AT_LEAST_1)
    learning_rate: float = setting(1e-3, "Adam's peak learning rate for the head.", POSITIVE)
    pretrained_lr_multiplier: float = setting(0.1, "The pretrained weights learn at this times --learning_rate.",
                                              POSITIVE)
    warmup_steps: int = setting(20, "Linear warmup steps.", NON_NEGATIVE)
    lr_decay: str = setting("linear", "Decay after warmup, to the last step of --max_epochs.", choices=DECAYS)
    clip_norm: float = setting(1.0, "Clip the averaged gradients to this global norm; 0 = off.", NON_NEGATIVE)
    precision: str = precision_setting(" OUTPUT_DIR/model keeps the precision used, for classify.")
    cycle_time_ms: float = setting(20.0, "Horovod's coordination cycle (HOROVOD_CYCLE_TIME), as train.py's.",
                                   NON_NEGATIVE)
    # The loop.
    max_epochs: int = setting(4, "Passes over the training texts at most.", AT_LEAST_1)
    eval_every: int = setting(0, "Validation accuracy every N steps; 0 = after each epoch.", NON_NEGATIVE)
    patience: int = setting(2, "Stop after this many validations in a row without a better accuracy; 0 = never.",
                            NON_NEGATIVE)
    log_every: int = setting(10, "Progress line every N steps.", AT_LEAST_1)
    checkpoint_every: int = setting(100, "Checkpoint every N steps (and at every validation).", AT_LEAST_1)
    keep_checkpoints: int = setting(2, "Checkpoints kept.", AT_LEAST_1)
    max_runtime_minutes: float = setting(0.0, "Stop (checkpointed, exit status 75) after this much wall time; "
                                         "0 = no limit. Rerun the same command to resume.", NON_NEGATIVE)

    def __post_init__(self):
        super().__post_init__()
        if self.data_dir:
            raise ValueError("--data_dir is not read by finetune; the texts are --train/--val/--test or --imdb_dir")
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        if os.path.abspath(self.output_dir) == os.path.abspath(self.model_dir):
            raise ValueError("--output_dir must not be the pretrained --model_dir")
        given = [name for name in ("train", "val", "test") if getattr(self, name)]
        if self.imdb_dir and given:
            raise ValueError(f"give --imdb_dir or --train/--val/--test, not both (also got --{given[0]})")
        if not self.imdb_dir and len(given) < 3:
            missing = [name for name in ("train", "val", "test") if not getattr(self, name)]
            raise ValueError(f"--{missing[0]} is required (or --imdb_dir)")
        if self.final_imdb_test and not self.imdb_dir:
            raise ValueError("--final_imdb_test needs --imdb_dir")
        if self.final_imdb_test and self.final_imdb_test < self.imdb_test:
            raise ValueError(f"--final_imdb_test {self.final_imdb_test} is below --imdb_test {self.imdb_test}")
        if not self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")

    def rows_per_rank(self, world: int) -> int:
        """This job's texts per rank and step; ValueError when the ranks do not divide the global batch."""
        if self.global_batch % (world * self.backward_passes_per_step):
            raise ValueError(f"--global_batch {self.global_batch} does not divide over {world} rank(s) x "
                             f"--backward_passes_per_step {self.backward_passes_per_step}")
        return self.global_batch // world


def run(cfg: FinetuneConfig, stop: StopRequest) -> dict | None:
    """Fine-tunes and scores the model kept; returns the summary (None when the job had already finished)."""
    tf.keras.utils.set_random_seed(cfg.seed)
    dist.agree_on(settings_of(cfg))
    rank, world = dist.rank(), dist.size()

    # ---------------------------------------------------------------- input
    error = lock = None
    try:
        rows = cfg.rows_per_rank(world)
        task = load_task(cfg)
        texts = TrainingTexts.of(task.splits["train"], cfg.text_prep, cfg.max_bytes)
        plan = BatchPlan(texts.lengths, cfg.global_batch, cfg.seed)
        total_steps = cfg.max_epochs * plan.steps_per_epoch
        if cfg.warmup_steps >= total_steps and cfg.lr_decay != "constant":
            raise ValueError(f"--warmup_steps {cfg.warmup_steps} is not below the {total_steps} steps of "
                             f"--max_epochs {cfg.max_epochs}")
        pretrained, pretrained_checkpoint = modeldir.load(cfg.model_dir, cfg.precision)
        if dist.is_chief():  # the input is good (bad input leaves no output dir): this job's settings are its
            lock = open_output_dir(cfg)
            files.write_json(os.path.join(cfg.output_dir, SETTINGS), recorded_settings(cfg))
    except (CheckpointError, OSError, ValueError) as e:  # TaskError, InputError: ValueErrors
        error = e
        if lock:
            lock.release()
    dist.agree(error)

    # ------------------------------------------------------ model, head and optimizers
    tuner = FineTuner(pretrained, len(task.classes), cfg)
    schedules = {name: WarmupDecaySchedule(peak, cfg.warmup_steps, total_steps, cfg.lr_decay)
                 for name, peak in (("pretrained", cfg.learning_rate * cfg.pretrained_lr_multiplier),
                                    ("head", cfg.learning_rate))}
    optimizers = {name: tf.keras.optimizers.Adam(schedule) for name, schedule in schedules.items()}
    if modeldir.loss_scaled(cfg.precision):
        optimizers["pretrained"] = tf.keras.mixed_precision.LossScaleOptimizer(optimizers["pretrained"])
    groups = [(optimizers["pretrained"], tuner.pretrained_variables), (optimizers["head"], tuner.head_variables)]
    for optimizer, variables in groups:
        optimizer.build(variables)
    state = State()

    # ------------------------------------------------------------ update step
    update = make_update(tuner.loss, groups, cfg.backward_passes_per_step, cfg.clip_norm)

    # -------------------------------------------------- checkpoint and resume
    checkpoints = Checkpointer(cfg.output_dir, cfg.keep_checkpoints, writer=dist.is_chief(), model=tuner.model,
                               head=tuner.head, feature_mean=tuner.mean, feature_scale=tuner.scale,
                               pretrained_optimizer=optimizers["pretrained"],
                               head_optimizer=optimizers["head"], **state.variables())
    error, restored, history = None, None, []
    if dist.is_chief():
        try:
            restored = checkpoints.restore()
            history = modeldir.earlier_history(cfg.output_dir, state.current_step) if restored else []
        except (CheckpointError, ValueError, OSError) as e:
            error = e
    dist.agree(error)
    dist.broadcast_variables(tuner.model.variables + tuner.head.variables + [tuner.mean, tuner.scale]
                             + optimizers["pretrained"].variables + optimizers["head"].variables
                             + list(state.variables().values()))
    if state.current_step == 0:  # as broadcast, so every rank agrees (only rank 0 restores): nothing restored
        tuner.standardise(texts, plan, rows)

    # ------------------------------------------------------------------- loop
    featurizer = Featurizer(cfg.model_dir, cfg.text_prep, cfg.readout, cfg.batch_size_per_worker, cfg.seq_length,
                            model=tuner.model)
    job = Job(cfg, task, texts, plan, total_steps, rows, tuner, schedules, optimizers, state, checkpoints, update,
              Evaluation.of(task.splits["val"], rank, world), featurizer, stop,
              tf.summary.create_file_writer(os.path.join(cfg.output_dir, "tensorboard")),
              modeldir.identity(cfg.model_dir, pretrained_checkpoint), lock)
    progress = Progress(first_step=state.current_step, history=history, resumed_from=restored)
    if state.finished and already_summarised(cfg.output_dir, state.current_step):
        if dist.is_chief():
            print(f"[finetune] {cfg.output_dir} finished at step {state.current_step}: nothing to do; its model, "
                  "classifier and summary.json are unchanged. Use another --output_dir to fine-tune again.",
                  flush=True)
        return None
    if not state.finished:
        train_loop(job, progress)
    if progress.stopped:
        return write_summary(job, progress, scores=None)

    # ---------------------------------------------------------------- test and summary
    return write_summary(job, progress, scores=score_kept(job))


# ---------------------------------------------------------------- input

def open_output_dir(cfg: FinetuneConfig) -> modeldir.Lock:
    """Rank 0: creates OUTPUT_DIR and takes its lock for the job's life. A job that resumes there must have
    the settings it was started with (besides RUN_CONTROL), or it would silently train another model."""
    files.make_dir(cfg.output_dir, "--output_dir")
    files.check_writable(os.path.join(cfg.output_dir, SETTINGS), "--output_dir")
    lock = modeldir.Lock(cfg.output_dir).acquire()
    path, settings = os.path.join(cfg.output_dir, SETTINGS), recorded_settings(cfg)
    if os.path.exists(path) and Checkpointer(cfg.output_dir, writer=False).candidates():
        with open(path) as f:
            saved = json.load(f)
        differ = [k for k in settings if saved.get(k) != settings[k]]
        if differ:
            lock.release()
            raise ValueError(f"--output_dir {cfg.output_dir} holds a fine-tuning run with other settings ("
                             + "; ".join(f"--{k} was {saved.get(k)!r}, now {settings[k]!r}" for k in differ)
                             + "); run it with those, or use another --output_dir")
    return lock


def recorded_settings(cfg: FinetuneConfig) -> dict:
    """What OUTPUT_DIR/settings.json holds: the settings a resumed job must share."""
    return {k: v for k, v in settings_of(cfg).items() if k not in RUN_CONTROL}


def settings_of(cfg: FinetuneConfig) -> dict:
    """The settings every rank must share (threads are per host and may differ)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("intra_op_threads", "inter_op_threads")}


def load_task(cfg: FinetuneConfig) -> Task:
    """The labelled splits (every label checked before any model is read)."""
    if cfg.imdb_dir:
        if not os.path.isdir(cfg.imdb_dir):
            raise FileNotFoundError(f"--imdb_dir {cfg.imdb_dir}: no such directory")
        return load_imdb(cfg.imdb_dir, cfg.imdb_train, cfg.imdb_val, cfg.imdb_test,
                         cfg.final_imdb_test or cfg.imdb_test, cfg.seed)
    return csv_task("finetune", {"train": cfg.train, "val": cfg.val, "test": cfg.test}, cfg.text_column,
                    cfg.label_column, cfg.encoding)


@dataclasses.dataclass
class TrainingTexts:
    """The training texts as the model reads them (encoded, cut to --max_bytes), with their labels."""

    encoded: list[bytes]
    labels: np.ndarray
    lengths: np.ndarray
    cut: int  # texts longer than max_bytes
    bytes_kept: float  # the fraction of all their bytes read

    @classmethod
    def of(cls, split: Split, text_prep: str, max_bytes: int) -> "TrainingTexts":
        whole = [encode(text, text_prep) for text in split.texts]
        full = np.array([len(e) for e in whole], np.int64)
        encoded = [e[:max_bytes] for e in whole]
        return cls(encoded, split.labels, np.minimum(full, max_bytes), int(np.sum(full > max_bytes)),
                   float(np.minimum(full, max_bytes).sum() / max(full.sum(), 1)))


class BatchPlan:
    """Which training texts make each global batch, from (seed, epoch) alone, so that every rank and every
    resumed run draws the same ones: the texts shuffled, sorted by length in pools of POOL_BATCHES
    batches, cut into batches, and the batches shuffled. The last batch of an epoch is filled up with
    -1 (no text)."""

    def __init__(self, lengths: np.ndarray, global_batch: int, seed: int):
        self.lengths, self.global_batch, self.seed = lengths, global_batch, seed
        self.steps_per_epoch = -(-len(lengths) // global_batch)
        self._cached = (None, None)

    def batch(self, step: int) -> np.ndarray:
        """The text indices of step STEP's global batch (-1: no text)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._cached[0] != epoch:
            self._cached = (epoch, self._epoch(epoch))
        return self._cached[1][k]

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order, pool, batches = rng.permutation(len(self.lengths)), self.global_batch * POOL_BATCHES, []
        for first in range(0, len(order), pool):
            chunk = order[first:first + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.global_batch] for i in range(0, len(chunk), self.global_batch)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        return [np.concatenate([b, np.full(self.global_batch - len(b), -1)]) for b in batches]


def rank_batch(texts: TrainingTexts, indices: np.ndarray, step: int, first_row: int, rows: int) -> dict:
    """This rank's ROWS texts of a global batch, padded at the end to the longest, with the weights that
    make the sum over every rank's rows the global mean: 1 / (texts in the global batch) for each text's
    classification loss, 1 / (next-byte targets in the global batch) for each target byte."""
    real = indices >= 0
    lengths = np.where(real, texts.lengths[np.maximum(indices, 0)], 1)
    mine = slice(first_row, first_row + rows)
    longest = int(lengths[mine].max())
    x = np.zeros([rows, longest], np.int32)
    for r, i in enumerate(indices[mine]):
        if i >= 0:
            x[r, :lengths[first_row + r]] = np.frombuffer(texts.encoded[i], np.uint8)
    targets = np.where(real, lengths - 1, 0)
    byte_weight = (np.arange(longest - 1)[None, :] < targets[mine, None]) / max(targets.sum(), 1)
    return {"inputs": tf.constant(x), "lengths": tf.constant(lengths[mine], tf.int32),
            "labels": tf.constant(np.where(real, texts.labels[np.maximum(indices, 0)], 0)[mine], tf.int32),
            "text_weight": tf.constant(real[mine] / max(real.sum(), 1), tf.float32),
            "byte_weight": tf.constant(byte_weight, tf.float32),
            "rows": tf.constant(np.arange(first_row, first_row + rows), tf.int32),
            "step": tf.fill([rows], tf.constant(step, tf.int32))}


# ---------------------------------------------------------------- the model with its head

def pool(hs: tf.Tensor, lengths: tf.Tensor, readout: str) -> tf.Tensor:
    """The readout of hidden states [B, T, n] over each row's first LENGTHS steps, float32 [B, n] ([B, 3n]
    for concat_hidden): what inference.Featurizer gives for texts of those bytes."""
    hs = tf.cast(hs, tf.float32)
    if readout == CONCAT:
        return tf.concat([pool(hs, lengths, part) for part in CONCAT_PARTS], axis=1)
    if readout == "final_hidden":
        return tf.gather(hs, lengths - 1, axis=1, batch_dims=1)
    real = (tf.range(tf.shape(hs)[1])[None, :] < lengths[:, None])[:, :, None]
    if readout == "mean_hidden":
        return tf.reduce_sum(tf.where(real, hs, 0.0), axis=1) / tf.cast(lengths, tf.float32)[:, None]
    return tf.reduce_max(tf.where(real, hs, -np.inf), axis=1)


class FineTuner:
    """The pretrained model, a linear head on its standardised readout, and the loss update.py minimises.

    The readout is standardised with its mean and standard deviation over the training texts under the
    pretrained weights (`standardise`), as the linear probe's features are: hidden-state means are
    small (a few hundredths), and Adam, whose steps are about the learning rate in weight units, would
    otherwise need thousands of steps to grow the head's weights to their scale. The head starts at
    zero (every class equally likely).
    """

    def __init__(self, model, classes: int, cfg: FinetuneConfig):
        self.model, self.cfg = model, cfg
        width = readout_width(cfg.readout, model.config.hidden_size)  # the other readouts' runs restore as before
        self.head = tf.keras.layers.Dense(classes, dtype="float32", kernel_initializer="zeros", name="head")
        self.head.build([None, width])
        self.mean = tf.Variable(tf.zeros([width]), trainable=False, name="feature_mean")
        self.scale = tf.Variable(tf.ones([width]), trainable=False, name="feature_scale")
        # The softmax layer takes part only through the auxiliary loss: without it, it gets no gradient.
        layers = [model.embed, model.rnn] + ([model.out] if cfg.aux_lm_weight else [])
        self.pretrained_variables = [v for layer in layers for v in layer.trainable_variables]
        self.head_variables = self.head.trainable_variables

    def hidden(self, inputs):
        """Hidden states [B, T, n] of texts padded at their end (the unmasked recurrence: nothing after a
        text's last byte changes what came before it)."""
        return self.model.rnn(self.model.embed(inputs), self.model.zero_state(tf.shape(inputs)[0]))[0]

    def features(self, inputs, lengths):
        """The readout [B, width] of texts padded at their end, before standardising."""
        return pool(self.hidden(inputs), lengths, self.cfg.readout)

    def classify(self, features):
        """Class logits of readouts."""
        return self.head((features - self.mean) / self.scale)

    def logits(self, inputs, lengths):
        """Class logits [B, classes] without dropout: the fine-tuned model's own prediction."""
        return self.classify(self.features(inputs, lengths))

    def standardise(self, texts: "TrainingTexts", plan: "BatchPlan", rows: int) -> None:
        """Sets the readout's mean and scale to those over the training texts (as they are cut for training)
        under the current weights: one pass, each rank reading its rows of the first epoch's batches (a
        collective). A unit that does not vary keeps scale 1, as scikit-learn's StandardScaler does."""
        features = tf.function(self.features, reduce_retracing=True)
        sums = np.zeros([2, self.mean.shape[0]])
        for step in range(plan.steps_per_epoch):
            batch = rank_batch(texts, plan.batch(step), step, dist.rank() * rows, rows)
            real = batch["text_weight"].numpy() > 0
            values = features(batch["inputs"], batch["lengths"]).numpy()[real].astype(np.float64)
            sums += [values.sum(axis=0), (values ** 2).sum(axis=0)]
        total, square = dist.total(sums).numpy() / len(texts.encoded)
        std = np.sqrt(np.maximum(square - total ** 2, 0.0))
        self.mean.assign(total.astype(np.float32))
        self.scale.assign(np.where(std > 1e-8 * np.maximum(np.abs(total), 1.0), std, 1.0).astype(np.float32))

    def loss(self, inputs, lengths, labels, text_weight, byte_weight, rows, step):
        """(loss, (per-text [classification, next-byte] shares of the global means,)) for update.py.

        The loss is scaled by ranks x micro-batches because update.py averages over both: the update
        then follows the mean over the global batch, whatever the split.
        """
        hs = self.hidden(inputs)
        features = (pool(hs, lengths, self.cfg.readout) - self.mean) / self.scale
        if self.cfg.dropout:
            # The mask of the global batch's row, drawn from (seed, step): the same on any rank.
            noise = tf.random.stateless_uniform([self.cfg.global_batch, features.shape[1]],
                                                tf.stack([self.cfg.seed, step[0]]))
            keep = tf.gather(noise, rows) >= self.cfg.dropout
            features = tf.where(keep, features / (1.0 - self.cfg.dropout), 0.0)
        classification = xent(labels, self.head(features)) * text_weight
        if self.cfg.aux_lm_weight:
            next_byte = tf.reduce_sum(xent(inputs[:, 1:], tf.cast(self.model.out(hs[:, :-1]), tf.float32))
                                      * byte_weight, axis=1)
        else:
            next_byte = tf.zeros_like(classification)
        shares = tf.stack([classification, next_byte], axis=1)
        total = tf.reduce_sum(classification) + self.cfg.aux_lm_weight * tf.reduce_sum(next_byte)
        return total * (dist.size() * self.cfg.backward_passes_per_step), (shares,)

    def classifier(self, labels: list[str], info: dict) -> Classifier:
        """The standardisation and head as a classifier.Classifier: two classes as one row of the second
        class's log-odds (softmax of two logits is the sigmoid of their difference), more as they are."""
        kernel, bias = (v.numpy().astype(np.float64) for v in self.head.weights)
        coef, intercept = ((kernel[:, 1] - kernel[:, 0])[None, :], np.array([bias[1] - bias[0]])) \
            if kernel.shape[1] == 2 else (kernel.T, bias)
        return Classifier(labels, coef, intercept, self.mean.numpy().astype(np.float64),
                          self.scale.numpy().astype(np.float64), info)


class State:
    """What a checkpoint restores besides the weights and optimizers; the same on every rank."""

    def __init__(self):
        def counter(name, value=0):
            return tf.Variable(value, dtype=tf.int64, trainable=False, name=name)

        self.step, self.best_step, self.since_best = counter("step"), counter("best_step", -1), counter("since_best")
        self.finished, self.skipped = counter("finished"), counter("skipped_steps")
        self.best_val = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_val_accuracy")

    def variables(self) -> dict:
        return {"step": self.step, "best_step": self.best_step, "since_best": self.since_best,
                "finished": self.finished, "skipped": self.skipped, "best_val_accuracy": self.best_val}

    @property
    def current_step(self) -> int:
        return int(self.step.numpy())


def already_summarised(output_dir: str, step: int) -> bool:
    """summary.json holds the test scores of the run that finished at STEP."""
    try:
        with open(os.path.join(output_dir, "summary.json")) as f:
            summary = json.load(f)
        return summary.get("final_step") == step and summary.get("test_accuracy") is not None
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------- loop

@dataclasses.dataclass
class Evaluation:
    """This rank's share of a split (every WORLD-th text from RANK), scored by summing over ranks."""

    texts: list[str]
    labels: np.ndarray
    indices: np.ndarray  # in the split

    @classmethod
    def of(cls, split: Split, rank: int, world: int) -> "Evaluation":
        texts = [t for i, t in enumerate(split.texts) if i % world == rank]
        indices = np.arange(rank, len(split.labels), world)
        return cls(texts, split.labels[indices], indices)

    def correct(self, predicted: np.ndarray, sizes: tuple[int, ...]) -> list[float]:
        """Accuracy over the split's first N texts for each N in SIZES (a collective)."""
        hits = predicted == self.labels
        totals = dist.total(np.array([hits[self.indices < n].sum() for n in sizes], np.float64)).numpy()
        return [float(hit / n) for hit, n in zip(totals, sizes)]


@dataclasses.dataclass
class Job:
    """What the loop needs, built by run()'s sections."""

    cfg: FinetuneConfig
    task: Task
    texts: TrainingTexts
    plan: BatchPlan
    total_steps: int
    rows: int  # texts per rank and step
    tuner: FineTuner
    schedules: dict
    optimizers: dict
    state: State
    checkpoints: Checkpointer
    update: object
    val: Evaluation
    featurizer: Featurizer  # validation, on the model being trained
    stop: StopRequest
    writer: object  # TensorBoard
    pretrained: dict  # the identity of the pretrained checkpoint
    lock: modeldir.Lock | None  # rank 0's on OUTPUT_DIR, held for the job's life


@dataclasses.dataclass
class Progress:
    """What the loop reports (progress lines, TensorBoard, summary.json)."""

    first_step: int
    history: list
    resumed_from: str | None
    started: float = dataclasses.field(default_factory=time.time)
    train_loss: float = math.nan
    stopped: str | None = None  # the stop request's reason
    early_stopped: bool = False


def train_loop(job: Job, progress: Progress) -> None:
    """From the current step to the end of --max_epochs, or until validation stops improving."""
    cfg, state, plan = job.cfg, job.state, job.plan
    rank, start = dist.rank(), state.current_step
    announce(job, progress, start)
    window, started, skipped_in_a_row = np.zeros(3), time.time(), 0
    for step in range(start, job.total_steps):
        batch = rank_batch(job.texts, plan.batch(step), step, rank * job.rows, job.rows)
        loss, norm, finite, votes, (shares,) = job.update(batch, tf.constant(job.stop.vote()))
        state.step.assign_add(1)
        skipped_in_a_row = 0 if bool(finite) else skipped_in_a_row + 1
        state.skipped.assign_add(0 if bool(finite) else 1)
        if skipped_in_a_row >= 20:
            raise ValueError(f"the gradients were not finite for 20 updates in a row (step {step + 1}); lower "
                             "--learning_rate, or use --precision=fp32 or mixed_bfloat16")
        window += [*tf.reduce_sum(shares, axis=0).numpy(), 1]
        done = step + 1
        if done % cfg.log_every == 0 or done == job.total_steps:
            report_progress(job, progress, window, started, done, float(loss), float(norm))
            window, started = np.zeros(3), time.time()
        validating = done % (cfg.eval_every or plan.steps_per_epoch) == 0 or done == job.total_steps
        if validating:
            validation_started = time.time()
            validate(job, progress, done)
            started += time.time() - validation_started  # texts/s and ETA count training time only
        stopping = float(votes) > 0
        if done == job.total_steps or progress.early_stopped:
            state.finished.assign(1)
        if done % cfg.checkpoint_every == 0 or validating or stopping or state.finished:
            save_checkpoint(job, done)
        if stopping:
            progress.stopped = job.stop.reason or "another rank's request"
        if stopping or state.finished:
            break


def announce(job: Job, progress: Progress, start: int) -> None:
    """The job's first line: its shape, task, objective and where it starts."""
    if not dist.is_chief():
        return
    cfg, texts = job.cfg, job.texts
    where = (f"resumed from {progress.resumed_from} at step {start}" if progress.resumed_from
             else f"starting from {cfg.model_dir}")
    print(f"[finetune] {dist.size()} rank(s) x {job.rows} texts = global batch {cfg.global_batch}; "
          f"{len(texts.encoded)} training texts ({texts.cut} cut to --max_bytes {cfg.max_bytes}, "
          f"{100 * texts.bytes_kept:.0f}% of their bytes read), {len(job.task.classes)} classes; "
          f"{job.plan.steps_per_epoch} steps per epoch, {job.total_steps} at most; head on {cfg.readout}, dropout "
          f"{cfg.dropout:g}, auxiliary next-byte loss x {cfg.aux_lm_weight:g}; LR {cfg.learning_rate:g} (head), "
          f"{cfg.learning_rate * cfg.pretrained_lr_multiplier:g} (pretrained); {cfg.precision}; gate math: "
          f"{kernels.status()}; {where}", flush=True)


def report_progress(job: Job, progress: Progress, window: np.ndarray, started: float, step: int, loss: float,
                    norm: float) -> None:
    """The progress line and its TensorBoard scalars, over the steps since the last line (a collective)."""
    classification, next_byte, steps = dist.total(window[:2]).numpy().tolist() + [window[2]]
    classification, next_byte = classification / steps, next_byte / steps
    progress.train_loss = classification + job.cfg.aux_lm_weight * next_byte
    seconds = time.time() - started
    if not dist.is_chief():
        return
    texts_per_s = steps * job.cfg.global_batch / max(seconds, 1e-9)
    eta = (job.total_steps - step) * seconds / steps
    lm = f" next-byte {next_byte:.4f}" if job.cfg.aux_lm_weight else ""
    print(f"[finetune] step {step}/{job.total_steps} epoch {(step - 1) // job.plan.steps_per_epoch + 1} loss "
          f"{progress.train_loss:.4f} (classification {classification:.4f}{lm}) lr "
          f"{float(job.schedules['head'](step - 1)):.3g} grad_norm {norm:.3f} skipped "
          f"{int(job.state.skipped.numpy())} texts/s {texts_per_s:,.1f} eta {eta:,.0f}s", flush=True)
    with job.writer.as_default(step=step):
        tf.summary.scalar("train/loss", progress.train_loss)
        tf.summary.scalar("train/classification_loss", classification)
        if job.cfg.aux_lm_weight:
            tf.summary.scalar("train/next_byte_bpc", next_byte / math.log(2))
        tf.summary.scalar("train/texts_per_second", texts_per_s)
        tf.summary.scalar("learning_rate", job.schedules["head"](step - 1))


def validate(job: Job, progress: Progress, step: int) -> None:
    """Validation accuracy of the model as it is (a collective); a better one is written out as the model
    kept, and --patience worse ones in a row stop the job."""
    state, cfg = job.state, job.cfg
    features = job.featurizer.transform(job.val.texts)
    predicted = np.argmax(job.tuner.classify(features).numpy(), axis=1)
    accuracy, = job.val.correct(predicted, (len(job.task.splits["val"].labels),))
    better = accuracy > float(state.best_val.numpy())
    if better:
        state.best_val.assign(accuracy)
        state.best_step.assign(step)
        state.since_best.assign(0)
        error = None
        if dist.is_chief():
            try:
                write_kept(cfg, job.tuner, job.task.classes, step, accuracy, job.pretrained)
            except (CheckpointError, OSError, ValueError) as e:  # every rank stops with rank 0's one line
                error = e
        dist.agree(error)
    else:
        state.since_best.assign_add(1)
    progress.early_stopped = bool(cfg.patience) and int(state.since_best.numpy()) >= cfg.patience
    progress.history.append({"step": step, "epoch": step / job.plan.steps_per_epoch, "val_accuracy": accuracy,
                             "train_loss": progress.train_loss, "kept": better})
    if dist.is_chief():
        print(f"[eval] step {step} validation accuracy {accuracy:.4f} (best {float(state.best_val.numpy()):.4f} at "
              f"step {int(state.best_step.numpy())})" + ("; stopping: no better one in --patience "
                                                        f"{cfg.patience} validations" if progress.early_stopped
                                                        else ""), flush=True)
        with job.writer.as_default(step=step):
            tf.summary.scalar("val/accuracy", accuracy)
        write_progress_summary(job, progress)


def write_kept(cfg: FinetuneConfig, tuner: FineTuner, classes: list[str], step: int, val_accuracy: float,
               pretrained: dict) -> None:
    """OUTPUT_DIR/model and OUTPUT_DIR/classifier.{json,npz}: the model as it is now, its standardisation and
    head as a classifier over the readout, tied to the model by its checkpoint's identity."""
    folder = os.path.join(cfg.output_dir, "model")
    info = {"step": step, "val_accuracy": val_accuracy, "pretrained": pretrained}
    modeldir.write_model(folder, tuner.model, step, "finetune.json", info)
    identity = modeldir.identity(folder, tf.train.latest_checkpoint(os.path.join(folder, "checkpoints")))
    tuner.classifier(classes, {"featurization": {"text_prep": cfg.text_prep, "readout": cfg.readout},
                               "fine_tuned": info, "model_dir": identity["model_dir"],
                               "checkpoint": {k: identity[k] for k in modeldir.IDENTITY_KEYS}}).save(cfg.output_dir)


def save_checkpoint(job: Job, step: int) -> None:
    """Rank 0 writes the checkpoint; every rank learns whether it could."""
    error = None
    if dist.is_chief():
        try:
            job.checkpoints.save(step)
        except CheckpointError as e:
            error = e
    dist.agree(error)


# ---------------------------------------------------------------- test and summary

def score_kept(job: Job) -> dict:
    """Accuracy of the written classifier on the model kept, read as classify reads them (a collective):
    {split: accuracy} for val, test and, with --final_imdb_test, final_test."""
    cfg, splits = job.cfg, job.task.splits
    classifier = Classifier.load(cfg.output_dir)
    featurizer = Featurizer(os.path.join(cfg.output_dir, "model"), **classifier.featurization,
                            batch_size=cfg.batch_size_per_worker, chunk=cfg.seq_length)
    classifier.check(featurizer)
    scores = {}
    if "final_test" in splits and splits["test"].starts(splits["final_test"]):
        share = Evaluation.of(splits["final_test"], dist.rank(), dist.size())
        sizes = (len(splits["test"].labels), len(splits["final_test"].labels))
        scores["test"], scores["final_test"] = share.correct(predict(classifier, featurizer, share), sizes)
    else:
        for split in [s for s in ("test", "final_test") if s in splits]:
            share = Evaluation.of(splits[split], dist.rank(), dist.size())
            scores[split], = share.correct(predict(classifier, featurizer, share), (len(splits[split].labels),))
    return scores


def predict(classifier: Classifier, featurizer: Featurizer, share: Evaluation) -> np.ndarray:
    return np.argmax(classifier.predict_proba(featurizer.transform(share.texts)), axis=1)


def summary_of(job: Job, progress: Progress) -> dict:
    cfg, state, texts = job.cfg, job.state, job.texts
    return {
        "final_step": state.current_step,
        "total_steps": job.total_steps,
        "steps_per_epoch": job.plan.steps_per_epoch,
        "finished": bool(state.finished.numpy()),
        "stopped_early": progress.stopped,
        "early_stopped": progress.early_stopped,
        "best_step": int(state.best_step.numpy()),
        "best_val_accuracy": float(state.best_val.numpy()),
        "skipped_steps": int(state.skipped.numpy()),
        "world_size": dist.size(),
        "sizes": {s: int(split.labels.size) for s, split in job.task.splits.items()},
        "classes": job.task.classes,
        "training_texts_cut": texts.cut,
        "training_bytes_read": texts.bytes_kept,
        "pretrained": job.pretrained,
        "settings": settings_of(cfg),
        "history": progress.history,
    }


def write_progress_summary(job: Job, progress: Progress) -> None:
    """Rank 0: summary.json as it stands (the validation curve so far), replaced at each validation."""
    files.write_json(os.path.join(job.cfg.output_dir, "summary.json"), summary_of(job, progress))


def write_summary(job: Job, progress: Progress, scores: dict | None) -> dict:
    """OUTPUT_DIR/summary.json (rank 0) and the last line; every rank returns the summary."""
    cfg = job.cfg
    summary = summary_of(job, progress)
    summary["wall_seconds_this_run"] = time.time() - progress.started
    if scores is not None:
        summary.update({f"{split}_accuracy": accuracy for split, accuracy in scores.items()})
    job.writer.flush()
    if dist.is_chief():
        files.write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
        if progress.stopped:
            print(f"[finetune] stopped at step {summary['final_step']} ({progress.stopped}); checkpoint written; "
                  "run the same command to resume", flush=True)
        else:
            final = (f", {scores['final_test']:.4f} on all {summary['sizes']['final_test']:,} final test texts"
                     if "final_test" in scores else "")
            print(f"[finetune] done: test accuracy {scores['test']:.4f}{final}, with the model of step "
                  f"{summary['best_step']} (validation {summary['best_val_accuracy']:.4f}); classify with "
                  f"--model_dir {os.path.join(cfg.output_dir, 'model')} --classifier {cfg.output_dir}", flush=True)
    return summary


# ---------------------------------------------------------------- command line

def main(argv):
    stopping.run_command(argv, "finetune", FinetuneConfig, start_horovod, run,
                         (CheckpointError, FileNotFoundError, ValueError), memory_hint)  # TaskError etc: ValueErrors


def start_horovod(cfg: FinetuneConfig) -> None:
    dist.init(cfg.intra_op_threads, cfg.inter_op_threads, cycle_time_ms=cfg.cycle_time_ms)


def memory_hint(cfg: FinetuneConfig) -> str:
    return (f"global batch {cfg.global_batch} of texts up to {cfg.max_bytes} bytes); lower --max_bytes or raise "
            "--backward_passes_per_step")


def entry():
    define(FinetuneConfig)
    app.run(main)


if __name__ == "__main__":
    entry()
