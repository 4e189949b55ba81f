"""The project's one flag set: each setting is defined once, as a field of a frozen dataclass, and the
absl flags are made from those fields.

CommonConfig holds what every command shares (where the model and data are, the shape of a batch,
threads); TrainConfig adds train.py's model, optimizer, schedule and loop settings. Every setting is
an absl flag, so it can come from a `--flagfile` under configs/ and be overridden on the command line.
`TrainConfig.from_flags()` snapshots the parsed flags and validates them (each field's own rule,
then the rules between fields), so inconsistent settings stop with one line before any work (or any
Horovod process) starts.
"""

from __future__ import annotations

import dataclasses
import math

from absl import flags

from horovod_mlstm.hardware import AUTO
from horovod_mlstm.model import PRECISIONS, ModelConfig
from horovod_mlstm.schedule import DECAYS, SCALING_RULES, peak_learning_rate

FLAGS = flags.FLAGS
BUILTIN_DATA_DIR = "data/builtin"
GRADIENT_REDUCTIONS = ("average", "adasum")

# How a field's value is checked; each rule is one line naming the flag.
AT_LEAST_1 = "at least 1"
NON_NEGATIVE = "a finite number >= 0"  # also refuses NaN and infinity
POSITIVE = "a positive number"  # finite


def setting(default, help: str, rule: str = "", choices: tuple[str, ...] = ()):
    """A config field that is also an absl flag: its default, help text, value rule and choices."""
    return dataclasses.field(default=default, metadata={"help": help, "rule": rule, "choices": choices})


def precision_setting(note: str = ""):
    """--precision as every training command takes it: auto (hardware.resolve at start-up) or a policy."""
    return setting(AUTO, "Keras mixed-precision policy; auto chooses from the hardware at start-up: mixed_float16 "
                   "on a GPU, mixed_bfloat16 on a CPU that computes bf16 natively (AVX512_BF16 or AMX, as oneDNN may "
                   "use them), fp32 elsewhere (emulated bf16 is slower than fp32)." + note, choices=(AUTO, *PRECISIONS))


@dataclasses.dataclass(frozen=True)
class CommonConfig:
    """What every command shares: where the model and data are, the shape of a batch, threads."""

    model_dir: str = setting("runs/mlstm", "Checkpoints, config.json, TensorBoard logs, summary.json.")
    data_dir: str = setting("", f"Preprocessed TFRecord shards; empty = the built-in corpus in {BUILTIN_DATA_DIR}.")
    seq_length: int = setting(256, "Bytes per window (truncated BPTT length).", AT_LEAST_1)
    batch_size_per_worker: int = setting(32, "Contiguous byte streams per rank (sequences per batch).", AT_LEAST_1)
    seed: int = setting(0, "Random seed (initial weights, sampling).")
    intra_op_threads: int = setting(0, "TensorFlow intra-op threads per rank on CPU; 0 = TF default.", NON_NEGATIVE)
    inter_op_threads: int = setting(0, "TensorFlow inter-op threads per rank; 0 = TF default.", NON_NEGATIVE)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            _check(field, getattr(self, field.name))
        if not self.model_dir:
            raise ValueError("--model_dir must not be empty")

    @classmethod
    def from_flags(cls, flag_values: flags.FlagValues = FLAGS):
        """The parsed flags as a validated config; ValueError naming the first bad flag."""
        return cls(**{f.name: _from_flag(f, flag_values[f.name].value) for f in dataclasses.fields(cls)})

    @property
    def data_path(self) -> str:
        return self.data_dir or BUILTIN_DATA_DIR


@dataclasses.dataclass(frozen=True)
class TrainConfig(CommonConfig):
    """train.py's settings: the model, the optimizer and its schedule, distribution, the loop, stopping."""

    # Model.
    hidden_size: int = setting(4096, "mLSTM units.", AT_LEAST_1)
    embed_size: int = setting(64, "Byte embedding size.", AT_LEAST_1)
    weight_norm: bool = setting(True, "Weight-normalise the four mLSTM matrices.")
    precision: str = precision_setting()
    xla: bool = setting(False, "Compile the forward/backward pass with XLA (jit_compile).")
    # Optimizer and learning-rate schedule.
    learning_rate: float = setting(5e-4, "Adam learning rate at --reference_batch (before scaling).", POSITIVE)
    reference_batch: int = setting(128, "Global batch (sequences) at which --learning_rate applies.", AT_LEAST_1)
    batch_scaling: str = setting("sqrt", "How the peak LR grows with the global batch.", choices=SCALING_RULES)
    max_learning_rate: float = setting(3e-3, "Cap on the scaled peak LR; 0 = no cap.", NON_NEGATIVE)
    warmup_steps: int = setting(100, "Linear warmup steps.", NON_NEGATIVE)
    lr_decay: str = setting("linear", "Decay after warmup.", choices=DECAYS)
    lr_horizon_steps: int = setting(0, "Step at which the decay ends; 0 = --train_steps.", NON_NEGATIVE)
    clip_norm: float = setting(1.0, "Clip the averaged gradients to this global norm; 0 = off.", NON_NEGATIVE)
    adam_beta1: float = setting(0.9, "Adam beta1.")
    adam_beta2: float = setting(0.999, "Adam beta2.")
    adam_epsilon: float = setting(1e-8, "Adam epsilon.", POSITIVE)
    # Distribution.
    backward_passes_per_step: int = setting(1, "Micro-batches accumulated per update (one allreduce).", AT_LEAST_1)
    fp16_allreduce: bool = setting(False, "Compress gradients to float16 for the allreduce.")
    gradient_reduction: str = setting(
        "average", "How the ranks' gradients are combined: average, or Horovod's Adasum (not divided by the ranks, "
        "so no LR scaling with ranks: pair it with --batch_scaling=none). Adasum needs the MPI controller "
        "(horovodrun --mpi or mpirun) and a power-of-2 number of ranks; one rank keeps its own gradients.",
        choices=GRADIENT_REDUCTIONS)
    cycle_time_ms: float = setting(
        20.0, "Horovod's coordination cycle: sets HOROVOD_CYCLE_TIME, overriding horovodrun --cycle-time-ms; 0 "
        "leaves the launcher's or Horovod's (1 ms). On 2 CPU cores 1 ms cost 8 points of 2-process efficiency "
        "(docs/PERFORMANCE.md); a cycle adds at most its length of latency per update.", NON_NEGATIVE)
    elastic: bool = setting(False, "Run under Horovod elastic (launch with horovodrun --min-np/--max-np).")
    commit_every: int = setting(10, "Elastic: commit state every N steps (a lost worker costs at most N).",
                                AT_LEAST_1)
    # Loop.
    train_steps: int = setting(1000, "Total optimizer steps.", AT_LEAST_1)
    log_every: int = setting(10, "Progress line every N steps.", AT_LEAST_1)
    eval_every: int = setting(100, "Validation BPC every N steps; 0 = only at the end.", NON_NEGATIVE)
    eval_windows: int = setting(20, "Validation windows per evaluation; 0 = the whole split.", NON_NEGATIVE)
    eval_batch_size: int = setting(
        0, "Validation streams per rank; 0 = --batch_size_per_worker. Fix it to compare validation BPC between "
        "runs with different batches (each stream starts cold).", NON_NEGATIVE)
    checkpoint_every: int = setting(100, "Checkpoint every N steps (and at the end).", AT_LEAST_1)
    keep_checkpoints: int = setting(3, "Checkpoints kept.", AT_LEAST_1)
    milestone_chars: tuple = setting(
        (), "Also keep the model when training has seen these many characters (e.g. 1e6,3e6,1e7) as model dirs "
        "MODEL_DIR/milestones/chars-N that evaluate and transfer read; never rotated out (learning curves).")
    # Stopping early.
    max_runtime_minutes: float = setting(
        0.0, "Stop (checkpointed, exit status 75) once this much wall time has passed, as on SIGTERM/SIGUSR1; 0 = "
        "no limit. Rerun the same command to resume.", NON_NEGATIVE)
    divergence_bpc: float = setting(
        16.0, "Stop with an error when the training loss exceeds this many bits per character (an untrained byte "
        "model is at 8) or is not finite; 0 = never (the large-batch experiment records divergence instead).",
        NON_NEGATIVE)
    max_skipped_steps: int = setting(
        100, "Stop with an error after this many updates in a row were skipped for non-finite gradients (float16 "
        "loss scaling skips a few at the start).", AT_LEAST_1)

    def __post_init__(self):
        super().__post_init__()
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("--adam_beta1 and --adam_beta2 must be in [0, 1)")
        if self.warmup_steps >= self.horizon and self.lr_decay != "constant":
            raise ValueError(f"--warmup_steps ({self.warmup_steps}) must be below the decay horizon "
                             f"({self.horizon} steps: --lr_horizon_steps, or --train_steps when that is 0)")
        if any(m < 1 for m in self.milestone_chars):
            raise ValueError(f"--milestone_chars must be positive, got {list(self.milestone_chars)}")
        if self.gradient_reduction == "adasum" and self.elastic:
            raise ValueError("--gradient_reduction=adasum does not work with --elastic: Horovod elastic runs on Gloo, "
                             "which has no Adasum (and its world need not be a power of 2)")

    @property
    def horizon(self) -> int:
        return self.lr_horizon_steps or self.train_steps

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
        return ModelConfig(hidden_size=self.hidden_size, embed_size=self.embed_size, weight_norm=self.weight_norm,
                           precision=self.precision)


# ---------------------------------------------------------------- fields <-> flags

def _check(field: dataclasses.Field, value) -> None:
    rule, name = field.metadata.get("rule"), field.name
    if rule == AT_LEAST_1 and value < 1:
        raise ValueError(f"--{name} must be at least 1, got {value}")
    if rule == NON_NEGATIVE and not 0 <= value < math.inf:
        raise ValueError(f"--{name} must be {NON_NEGATIVE}, got {value}")
    if rule == POSITIVE and not 0 < value < math.inf:
        raise ValueError(f"--{name} must be {POSITIVE}, got {value}")


def _from_flag(field: dataclasses.Field, value):
    """A flag's parsed value as the field holds it (a list of character counts becomes a sorted tuple)."""
    if field.type != "tuple":
        return value
    try:
        return tuple(sorted({int(float(v)) for v in value}))
    except ValueError:
        raise ValueError(f"--{field.name} must be numbers of characters, got {value}") from None


def define(config_class, flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines an absl flag for each field of CONFIG_CLASS, from its type, default, help and choices."""
    for field in dataclasses.fields(config_class):
        name, default, help_ = field.name, field.default, field.metadata["help"]
        if field.metadata["choices"]:
            flags.DEFINE_enum(name, default, list(field.metadata["choices"]), help_, flag_values=flag_values)
        elif field.type == "tuple":
            flags.DEFINE_list(name, list(default), help_, flag_values=flag_values)
        else:
            define_flag = {"str": flags.DEFINE_string, "int": flags.DEFINE_integer, "float": flags.DEFINE_float,
                           "bool": flags.DEFINE_bool}[field.type]
            define_flag(name, default, help_, flag_values=flag_values)


def define_common(flag_values: flags.FlagValues = FLAGS) -> None:
    """The flags every command shares (CommonConfig)."""
    define(CommonConfig, flag_values)


def define_training(flag_values: flags.FlagValues = FLAGS) -> None:
    """Every flag of train.py (TrainConfig)."""
    define(TrainConfig, flag_values)
