"""The project's one flag set, in groups each CLI defines what it needs of, plus TrainConfig.

Every setting is an absl flag, so any of them can come from a `--flagfile` under configs/
and be overridden on the command line. TrainConfig snapshots the flags into a frozen
dataclass and validates them at start-up, so inconsistent settings stop with one line
before any work (or any Horovod process) starts.
"""

from __future__ import annotations

import dataclasses
import math

from absl import flags

from horovod_mlstm.model import PRECISIONS, ModelConfig
from horovod_mlstm.schedule import DECAYS, SCALING_RULES, peak_learning_rate

FLAGS = flags.FLAGS
BUILTIN_DATA_DIR = "data/builtin"


def define_common() -> None:
    """Flags every command shares: where the model and data are, the shape of a batch, threads."""
    flags.DEFINE_string("model_dir", "runs/mlstm", "Checkpoints, config.json, TensorBoard logs, summary.json.")
    flags.DEFINE_string("data_dir", "", f"Preprocessed TFRecord shards; empty = the built-in corpus in {BUILTIN_DATA_DIR}.")
    flags.DEFINE_integer("seq_length", 256, "Bytes per window (truncated BPTT length).")
    flags.DEFINE_integer("batch_size_per_worker", 32, "Contiguous byte streams per rank (sequences per batch).")
    flags.DEFINE_integer("seed", 0, "Random seed (initial weights, sampling).")
    flags.DEFINE_integer("intra_op_threads", 0, "TensorFlow intra-op threads per rank on CPU; 0 = TF default.")
    flags.DEFINE_integer("inter_op_threads", 0, "TensorFlow inter-op threads per rank; 0 = TF default.")


def define_training() -> None:
    """Model, optimizer, schedule and loop flags of train.py."""
    define_common()
    # Model.
    flags.DEFINE_integer("hidden_size", 4096, "mLSTM units.")
    flags.DEFINE_integer("embed_size", 64, "Byte embedding size.")
    flags.DEFINE_bool("weight_norm", True, "Weight-normalise the four mLSTM matrices.")
    flags.DEFINE_enum("precision", "fp32", list(PRECISIONS), "Keras mixed-precision policy.")
    flags.DEFINE_bool("xla", False, "Compile the forward/backward pass with XLA (jit_compile).")
    # Optimizer and learning-rate schedule.
    flags.DEFINE_float("learning_rate", 5e-4, "Adam learning rate at --reference_batch (before scaling).")
    flags.DEFINE_integer("reference_batch", 128, "Global batch (sequences) at which --learning_rate applies.")
    flags.DEFINE_enum("batch_scaling", "sqrt", list(SCALING_RULES), "How the peak LR grows with the global batch.")
    flags.DEFINE_float("max_learning_rate", 3e-3, "Cap on the scaled peak LR; 0 = no cap.")
    flags.DEFINE_integer("warmup_steps", 100, "Linear warmup steps.")
    flags.DEFINE_enum("lr_decay", "linear", list(DECAYS), "Decay after warmup.")
    flags.DEFINE_integer("lr_horizon_steps", 0, "Step at which the decay ends; 0 = --train_steps.")
    flags.DEFINE_float("clip_norm", 1.0, "Clip the averaged gradients to this global norm; 0 = off.")
    flags.DEFINE_float("adam_beta1", 0.9, "Adam beta1.")
    flags.DEFINE_float("adam_beta2", 0.999, "Adam beta2.")
    flags.DEFINE_float("adam_epsilon", 1e-8, "Adam epsilon.")
    # Distribution.
    flags.DEFINE_integer("backward_passes_per_step", 1, "Micro-batches accumulated per update (one allreduce).")
    flags.DEFINE_bool("fp16_allreduce", False, "Compress gradients to float16 for the allreduce.")
    flags.DEFINE_enum("gradient_reduction", "average", ["average", "adasum"], "How the ranks' gradients are combined: "
                      "average, or Horovod's Adasum (not divided by the ranks, so no LR scaling with ranks: pair it "
                      "with --batch_scaling=none). Adasum needs the MPI controller (horovodrun --mpi or mpirun) and "
                      "a power-of-2 number of ranks; one rank keeps its own gradients.")
    flags.DEFINE_float("cycle_time_ms", 20.0, "Horovod's coordination cycle: sets HOROVOD_CYCLE_TIME, overriding "
                       "horovodrun --cycle-time-ms; 0 leaves the launcher's or Horovod's (1 ms). On 2 CPU cores 1 ms "
                       "cost 8 points of 2-process efficiency (docs/PERFORMANCE.md); a cycle adds at most its "
                       "length of latency per update.")
    flags.DEFINE_bool("elastic", False, "Run under Horovod elastic (launch with horovodrun --min-np/--max-np).")
    flags.DEFINE_integer("commit_every", 10, "Elastic: commit state every N steps (a lost worker costs at most N).")
    # Loop.
    flags.DEFINE_integer("train_steps", 1000, "Total optimizer steps.")
    flags.DEFINE_integer("log_every", 10, "Progress line every N steps.")
    flags.DEFINE_integer("eval_every", 100, "Validation BPC every N steps; 0 = only at the end.")
    flags.DEFINE_integer("eval_windows", 20, "Validation windows per evaluation; 0 = the whole split.")
    flags.DEFINE_integer("eval_batch_size", 0, "Validation streams per rank; 0 = --batch_size_per_worker. Fix it to "
                         "compare validation BPC between runs with different batches (each stream starts cold).")
    flags.DEFINE_integer("checkpoint_every", 100, "Checkpoint every N steps (and at the end).")
    flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
    flags.DEFINE_list("milestone_chars", [], "Also keep the model when training has seen these many characters "
                      "(e.g. 1e6,3e6,1e7) as model dirs MODEL_DIR/milestones/chars-N that evaluate and transfer "
                      "read; never rotated out (learning curves).")
    # Stopping early.
    flags.DEFINE_float("max_runtime_minutes", 0.0, "Stop (checkpointed, exit status 75) once this much wall time has "
                       "passed, as on SIGTERM/SIGUSR1; 0 = no limit. Rerun the same command to resume.")
    flags.DEFINE_float("divergence_bpc", 16.0, "Stop with an error when the training loss exceeds this many bits per "
                       "character (an untrained byte model is at 8) or is not finite; 0 = never (the large-batch experiment records "
                       "divergence instead).")
    flags.DEFINE_integer("max_skipped_steps", 100, "Stop with an error after this many updates in a row were skipped "
                         "for non-finite gradients (float16 loss scaling skips a few at the start).")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A validated snapshot of the training flags."""

    model_dir: str
    data_dir: str
    seq_length: int
    batch_size_per_worker: int
    seed: int
    intra_op_threads: int
    inter_op_threads: int
    hidden_size: int
    embed_size: int
    weight_norm: bool
    precision: str
    xla: bool
    learning_rate: float
    reference_batch: int
    batch_scaling: str
    max_learning_rate: float
    warmup_steps: int
    lr_decay: str
    lr_horizon_steps: int
    clip_norm: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    backward_passes_per_step: int
    fp16_allreduce: bool
    gradient_reduction: str
    cycle_time_ms: float
    elastic: bool
    commit_every: int
    train_steps: int
    log_every: int
    eval_every: int
    eval_windows: int
    eval_batch_size: int
    checkpoint_every: int
    keep_checkpoints: int
    milestone_chars: tuple
    max_runtime_minutes: float
    divergence_bpc: float
    max_skipped_steps: int

    @classmethod
    def from_flags(cls) -> "TrainConfig":
        values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(cls)}
        try:
            values["milestone_chars"] = tuple(sorted({int(float(v)) for v in values["milestone_chars"]}))
        except ValueError:
            raise ValueError(f"--milestone_chars must be numbers of characters, got {values['milestone_chars']}") from None
        return cls(**values)

    def __post_init__(self):
        positive = ["seq_length", "batch_size_per_worker", "hidden_size", "embed_size", "train_steps",
                    "log_every", "checkpoint_every", "keep_checkpoints", "backward_passes_per_step", "commit_every",
                    "reference_batch", "max_skipped_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ["learning_rate", "adam_epsilon"]:
            if not getattr(self, name) > 0 or math.isinf(getattr(self, name)):
                raise ValueError(f"--{name} must be a positive number, got {getattr(self, name)}")
        for name in ["cycle_time_ms", "warmup_steps", "eval_every", "eval_windows", "eval_batch_size",
                     "lr_horizon_steps", "intra_op_threads", "inter_op_threads", "max_learning_rate", "clip_norm",
                     "max_runtime_minutes", "divergence_bpc"]:
            if not 0 <= getattr(self, name) < math.inf:  # also refuses NaN and inf
                raise ValueError(f"--{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("--adam_beta1 and --adam_beta2 must be in [0, 1)")
        if self.warmup_steps >= self.horizon and self.lr_decay != "constant":
            raise ValueError(f"--warmup_steps ({self.warmup_steps}) must be below the decay horizon "
                             f"({self.horizon} steps: --lr_horizon_steps, or --train_steps when that is 0)")
        if any(m < 1 for m in self.milestone_chars):
            raise ValueError(f"--milestone_chars must be positive, got {list(self.milestone_chars)}")
        if not self.model_dir:
            raise ValueError("--model_dir must not be empty")
        if self.gradient_reduction == "adasum" and self.elastic:
            raise ValueError("--gradient_reduction=adasum does not work with --elastic: Horovod elastic runs on Gloo, "
                             "which has no Adasum (and its world need not be a power of 2)")

    @property
    def horizon(self) -> int:
        return self.lr_horizon_steps or self.train_steps

    @property
    def data_path(self) -> str:
        return self.data_dir or BUILTIN_DATA_DIR

    @property
    def rows_per_worker(self) -> int:
        """Streams a rank carries: one per sequence of each accumulated micro-batch."""
        return self.batch_size_per_worker * self.backward_passes_per_step

    def global_batch(self, world_size: int) -> int:
        return self.rows_per_worker * world_size

    def peak_lr(self, world_size: int) -> float:
        return peak_learning_rate(self.learning_rate, self.global_batch(world_size), self.reference_batch,
                                  self.batch_scaling, self.max_learning_rate or None)

    def model_config(self) -> ModelConfig:
        return ModelConfig(hidden_size=self.hidden_size, embed_size=self.embed_size,
                           weight_norm=self.weight_norm, precision=self.precision)
