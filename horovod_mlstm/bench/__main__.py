"""The benchmark's command line: the flags, their validation, and which job runs.

    python -m horovod_mlstm.bench [--hidden_sizes 256,1024,4096] [--precisions fp32,mixed_bfloat16]
                                  [--seq_lengths 128,256] [--repeats 5] [--output bench.json] [--quick]
    python -m horovod_mlstm.bench --profile [--hidden_sizes 1024] [--precisions mixed_bfloat16] [--seq_lengths 256]
    python -m horovod_mlstm.bench --paper [--paper_hidden 4096] [--paper_streams 256] [--paper_seq 256]
                                  [--paper_precision mixed_bfloat16] [--paper_fit_streams 8,16,32,64]
                                  [--paper_memory_limit_gib 8]
    python -m horovod_mlstm.bench --inference --inference_texts sst/test.csv [--inference_model_dir runs/x]
                                  [--inference_max_texts 500] [--inference_batch_sizes 64]
                                  [--inference_chunks 256] [--inference_window_batches 16]

The first measures the step (step.py), 1 -> 2 process scaling (scaling.py) and the input side
(inputs.py); --profile breaks the step down by kind of op (profile.py); --paper measures one update
at the paper's per-rank shape (capacity.py); --inference measures the featuriser against the forward
matmul limit (inference.py). Each writes its JSON to --output, with this machine's
description and the precision it would choose (hardware.py), and prints its tables (report.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import platform
import sys

import tensorflow as tf
from absl import app, flags

from horovod_mlstm import files, hardware, kernels, modeldir, textfiles
from horovod_mlstm.bench import capacity, inference, inputs, report, scaling, step
from horovod_mlstm.bench.figures import GIB
from horovod_mlstm.bench.profile import profile_step
from horovod_mlstm.checkpoint import CheckpointError
from horovod_mlstm.jobs import JobError
from horovod_mlstm.model import PRECISIONS

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    def string(name, default, help_):
        flags.DEFINE_string(name, default, help_, flag_values=flag_values)

    def integer(name, default, help_):
        flags.DEFINE_integer(name, default, help_, flag_values=flag_values)

    def boolean(name, default, help_):
        flags.DEFINE_bool(name, default, help_, flag_values=flag_values)

    string("hidden_sizes", "256,1024,4096", "mLSTM sizes to measure (empty: only scaling and input).")
    string("precisions", "fp32,mixed_bfloat16", "Precisions to measure.")
    flags.DEFINE_list("seq_lengths", ["128", "256"], "Bytes per window for the step rates (batch 64; hidden 4096 "
                      "uses 16 x 64).", flag_values=flag_values)
    integer("repeats", 5, "Timed repeats after one warm-up.")
    integer("threads", 2, "TensorFlow intra-op threads for the in-process measurements.")
    boolean("scaling", True, "Measure 1 vs 2 processes with real train.py runs.")
    boolean("quick", False, "Tiny sizes, one repeat: a smoke test of the harness.")
    string("output", "bench.json", "Where the JSON results go.")
    boolean("profile", False, "Profile the project's step instead, at the step rates' shapes: op time by kind.")
    boolean("paper", False, "Measure one update at the paper's per-rank shape instead (memory, bytes).")
    integer("paper_hidden", 4096, "--paper: mLSTM units.")
    integer("paper_streams", 256, "--paper: streams (sequences) per rank.")
    integer("paper_seq", 256, "--paper: bytes per window.")
    flags.DEFINE_enum("paper_precision", "mixed_bfloat16", list(PRECISIONS), "--paper: precision (bf16 stands in "
                      "on CPU for the GPU's fp16: same byte sizes).", flag_values=flag_values)
    integer("paper_micro_batches", 1, "--paper: micro-batches per update (--backward_passes_per_step).")
    string("paper_fit_streams", "8,16,32,64", "--paper: further stream counts to measure for the linear fit of "
           "memory against streams; empty = none.")
    flags.DEFINE_float("paper_memory_limit_gib", 8.0, "--paper: a safety limit: refuse any shape whose estimated "
                       "peak (a process with TensorFlow plus the update's estimated need) exceeds this many GiB, so "
                       "that a measurement does not take the memory other jobs on the machine use.",
                       flag_values=flag_values)
    boolean("paper_force", False, "--paper: run even when the estimated peak exceeds --paper_memory_limit_gib.")
    boolean("inference", False, "Measure featurisation (inference.Featurizer) against the forward matmul limit "
            "instead.")
    string("inference_model_dir", "", "--inference: the model dir to read with; empty: a randomly initialised "
           "model of each --hidden_sizes and --precisions.")
    string("inference_texts", "", "--inference: the texts, a CSV with a header (--inference_text_column) or one "
           "text per line; plain or .gz.")
    string("inference_text_column", "sentence", "--inference: the CSV column that holds the texts.")
    integer("inference_max_texts", 0, "--inference: read at most this many texts (the file's first); 0 = all.")
    flags.DEFINE_list("inference_batch_sizes", ["64"], "--inference: texts per batch (the featuriser's batch_size).",
                      flag_values=flag_values)
    flags.DEFINE_list("inference_chunks", ["256"], "--inference: bytes per chunk (the featuriser's chunk).",
                      flag_values=flag_values)
    flags.DEFINE_list("inference_window_batches", ["16"], "--inference: batches' worth of texts read together, longest "
                      "first (1: each batch's texts on their own).", flag_values=flag_values)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    hiddens: list[int]
    precisions: list[str]
    seq_lengths: list[int]
    repeats: int
    quick: bool


def step_settings(fv: flags.FlagValues = FLAGS) -> StepSettings:
    """The step benchmark's and the profile's flags, checked; ValueError naming the bad one."""
    try:
        hiddens = [int(h) for h in fv.hidden_sizes.split(",") if h.strip()]
    except ValueError:
        raise ValueError(f"--hidden_sizes must be integers, got {fv.hidden_sizes}") from None
    try:
        seq_lengths = [int(x) for x in fv.seq_lengths]
    except ValueError:
        raise ValueError(f"--seq_lengths must be integers, got {','.join(fv.seq_lengths)}") from None
    precisions = fv.precisions.split(",")
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; choose from {sorted(PRECISIONS)}")
    if min([*hiddens, *seq_lengths, fv.repeats], default=1) < 1:
        raise ValueError("--hidden_sizes, --seq_lengths and --repeats must be positive")
    return StepSettings([32] if fv.quick else hiddens, precisions, seq_lengths, 1 if fv.quick else fv.repeats,
                        fv.quick)


@dataclasses.dataclass(frozen=True)
class PaperSettings:
    hidden: int
    streams: int
    seq: int
    precision: str
    micro_batches: int
    fit_streams: list[int]
    memory_limit_bytes: float
    force: bool

    def shapes(self) -> list[tuple[str, int]]:
        """Each stream count to measure, with the flag that asked for it."""
        return [("--paper_streams", self.streams)] + [("--paper_fit_streams", s) for s in self.fit_streams]


def paper_settings(fv: flags.FlagValues = FLAGS) -> PaperSettings:
    """--paper's flags, checked; ValueError naming the bad one."""
    try:
        fit_streams = [int(x) for x in fv.paper_fit_streams.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--paper_fit_streams={fv.paper_fit_streams!r} is not a list of stream counts "
                         "like 8,16,32") from None
    k = fv.paper_micro_batches
    if min([fv.paper_hidden, fv.paper_streams, fv.paper_seq, k, *fit_streams]) < 1:
        raise ValueError("--paper_hidden, --paper_streams, --paper_seq, --paper_micro_batches and "
                         "--paper_fit_streams must be positive")
    if any(s % k for s in [fv.paper_streams, *fit_streams]):
        raise ValueError(f"--paper_micro_batches={k} must divide --paper_streams and every --paper_fit_streams")
    if not fv.paper_memory_limit_gib > 0:
        raise ValueError(f"--paper_memory_limit_gib must be positive, got {fv.paper_memory_limit_gib}")
    return PaperSettings(fv.paper_hidden, fv.paper_streams, fv.paper_seq, fv.paper_precision, k, fit_streams,
                         fv.paper_memory_limit_gib * GIB, fv.paper_force)


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    model_dir: str
    texts_path: str
    texts: list[str]
    hiddens: list[int]
    precisions: list[str]
    shapes: list[inference.Shape]
    repeats: int


def inference_settings(fv: flags.FlagValues = FLAGS) -> InferenceSettings:
    """--inference's flags, checked, and its texts read; ValueError or OSError naming the bad one."""
    sizes = {}
    for name in ("inference_batch_sizes", "inference_chunks", "inference_window_batches"):
        try:
            sizes[name] = [int(x) for x in fv[name].value]
        except ValueError:
            raise ValueError(f"--{name} must be integers, got {','.join(fv[name].value)}") from None
        if not sizes[name] or min(sizes[name]) < 1:
            raise ValueError(f"--{name} must be positive integers, got {','.join(fv[name].value)}")
    if fv.inference_max_texts < 0:
        raise ValueError(f"--inference_max_texts must be 0 (all) or positive, got {fv.inference_max_texts}")
    if not fv.inference_texts:
        raise ValueError("--inference needs --inference_texts (a CSV or a file of one text per line)")
    settings = step_settings(fv)
    if fv.inference_model_dir:
        modeldir.read_config(fv.inference_model_dir)  # a missing or foreign model dir is one line now
    name = fv.inference_texts[:-3] if fv.inference_texts.endswith(".gz") else fv.inference_texts
    found = textfiles.texts(fv.inference_texts, fv.inference_text_column if name.endswith(".csv") else "")
    texts = list(itertools.islice(found, fv.inference_max_texts or None))
    shapes = [inference.Shape(b, c, w) for b in sizes["inference_batch_sizes"] for c in sizes["inference_chunks"]
              for w in sizes["inference_window_batches"]]
    return InferenceSettings(fv.inference_model_dir, fv.inference_texts, texts, settings.hiddens, settings.precisions,
                             shapes, settings.repeats)


def command() -> str:
    """This run's command line, as a user would type it."""
    return " ".join(["python -m horovod_mlstm.bench", *sys.argv[1:]])


def machine() -> dict:
    """This machine's description, the precision it would choose, and how this run computes."""
    description = hardware.describe()
    precision, reason = hardware.choose_precision(description)
    return {**description, "precision_choice": {"precision": precision, "reason": reason},
            "python": platform.python_version(), "threads": FLAGS.threads, "gate_math": kernels.status()}


def run_steps(settings: StepSettings) -> dict:
    """The default job: the step against the limit and the baselines, scaling, the input side."""
    result = {"command": command(), "machine": machine(), "limits": [], "project": [], "baseline": []}
    for hidden in settings.hiddens:
        limits, steps = step.measure_hidden(hidden, settings.precisions, settings.seq_lengths, settings.repeats,
                                            settings.quick)
        result["limits"] += limits
        result["project"] += [r for r in steps if "variant" not in r]
        result["baseline"] += [r for r in steps if "variant" in r]
    if FLAGS.scaling:
        result["scaling"] = scaling.scaling(settings.quick)
    result["input"] = inputs.input_rates(settings.repeats)
    print(f"[bench] input pipeline {result['input']['pipeline_bytes_per_s'] / 1e6:.1f} MB/s per rank; "
          f"preprocess {result['input']['preprocess_mb_per_s']:.1f} MB/s", flush=True)
    result["ratios"] = step.ratios(result["project"], result["baseline"])
    for name, value in result["ratios"].items():
        print(f"[bench] {name}: {value:.2f}x")
    print(report.step_table(result))
    return result


def run_profile(settings: StepSettings) -> dict:
    """--profile: the breakdown of the project's step at each shape the step rates use."""
    profiles = []
    for hidden in settings.hiddens:
        batch, seqs = step.step_shapes(hidden, settings.seq_lengths, settings.quick)
        for seq in seqs:
            for precision in settings.precisions:
                # --quick: 3 updates, so that one slow moment cannot put the forward pass over the update
                profiles.append(profile_step(hidden, precision, batch, seq, 3 if settings.quick else settings.repeats))
                print(report.profile_table(profiles[-1]) + "\n", flush=True)
    return {"command": command(), "machine": machine(), "profiles": profiles}


def run_paper(settings: PaperSettings) -> dict:
    """--paper: each stream count measured in its own fresh process."""
    runs = {}
    for count in sorted({streams for _, streams in settings.shapes()}):
        runs[count] = capacity.measure_fresh(hidden=settings.hidden, streams=count, seq=settings.seq,
                                             precision=settings.precision, micro_batches=settings.micro_batches,
                                             threads=FLAGS.threads)
        print(report.paper_progress(runs[count]), flush=True)
    result = capacity.summarize(runs, settings.streams)
    result["command"], result["machine"] = command(), machine()
    print(report.paper_tables(result))
    return result


def run_inference(settings: InferenceSettings) -> dict:
    """--inference: the featuriser's rate at each shape, against the forward matmul limit."""
    result = {"command": command(), "machine": machine(),
              "inference": {"model_dir": settings.model_dir or "random", "texts_file": settings.texts_path,
                            "texts": len(settings.texts)},
              **inference.measure(settings.model_dir, settings.hiddens, settings.precisions, settings.texts,
                                  settings.shapes, settings.repeats)}
    print(report.inference_table(result))
    return result


def checked_job():
    """(job, settings) from the flags, with --output and --paper's memory limit checked before any work."""
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    files.check_writable(FLAGS.output, "--output")
    if FLAGS.inference:
        return run_inference, inference_settings()
    if not FLAGS.paper:
        return (run_profile if FLAGS.profile else run_steps), step_settings()
    settings = paper_settings()
    if not settings.force:
        capacity.check_memory(settings.shapes(), settings.hidden, settings.seq, settings.precision,
                              settings.micro_batches, settings.memory_limit_bytes)
    return run_paper, settings


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)  # before TensorFlow starts
    try:
        job, settings = checked_job()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    try:
        result = job(settings)
    except (JobError, capacity.MeasurementFailed, CheckpointError) as e:
        sys.exit(f"error: {e}")
    files.write_json(FLAGS.output, result)
    print(f"[bench] wrote {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
