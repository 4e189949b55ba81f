"""Validation BPC against model size at an equal number of characters.

    python -m horovod_mlstm.experiments.model_size --flagfile_train configs/cpu_imdb.cfg \
        --out_dir runs/model_size [--hidden_sizes 256,512,1024] [--chars 4e6] [--np 2]

One train.py job per hidden size, every other setting the same (--flagfile_train, then the
overrides below): the same data, global batch, learning-rate schedule (warmup over the first 10%
of steps, then linear decay to zero at the last step) and characters. Each is evaluated on the
whole validation split at --evals points (the same fixed streams for every size), so the curves
compare like with like.
A finished run is reused: its directory is named by a digest of its flags, the config's included,
so an edited config trains anew.

Writes results.md, results.json and bpc.png (validation BPC against characters, and against
training wall time: characters / the run's characters per second) in --out_dir. NVIDIA's
sentiment-discovery reports about 1.64 / 1.33 / 1.12 BPC for 256 / 1024 / 4096 units after
full training on the whole Amazon corpus; different data and far more characters, so compare
the ordering and the gaps, not the values.
"""

from __future__ import annotations

import math
import os
import sys

from absl import app, flags

from horovod_mlstm import jobs
from horovod_mlstm.experiments import report

NVIDIA_AMAZON_BPC = {256: 1.64, 1024: 1.33, 4096: 1.12}  # sentiment-discovery's README, full Amazon corpus


def flagfile_flags(path: str) -> list[str]:
    """The flags of a train.py flagfile, given to each job one by one, so that a run's name (a digest
    of its flags) changes when the file's contents do and an edited config is never reused."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith(("#", "//"))]


def train(hidden: int, F) -> dict:
    """One job (or its finished summary): the size's validation curve and speed."""
    chars_per_step = F.np * F.batch_size_per_worker * F.seq_length
    steps = max(2, int(F.chars) // chars_per_step)
    settings = [*(flagfile_flags(F.flagfile_train) if F.flagfile_train else []), f"--hidden_size={hidden}",
                f"--batch_size_per_worker={F.batch_size_per_worker}", f"--seq_length={F.seq_length}",
                f"--train_steps={steps}", "--lr_horizon_steps=0",
                f"--warmup_steps={max(1, steps // 10)}",
                f"--eval_every={max(1, steps // F.evals)}", "--eval_windows=0", "--milestone_chars=",
                "--max_runtime_minutes=0", *F.train_args]
    model_dir, summary, reused = jobs.run_once(
        os.path.abspath(F.out_dir), f"h{hidden}", settings,
        [f"--checkpoint_every={steps}", f"--log_every={max(1, steps // 10)}"],
        f"[model_size] hidden {hidden}: training {steps} steps ({steps * chars_per_step:,} characters)",
        F.np, hostfile=F.hostfile)
    if reused:
        print(f"[model_size] hidden {hidden}: reusing {model_dir}", flush=True)
    if summary["final_step"] != steps or not math.isfinite(summary["val_bpc"]):
        raise ValueError(f"{model_dir} ended at step {summary['final_step']} of {steps} with validation BPC "
                         f"{summary['val_bpc']}: remove it and run again")
    cps = summary["chars_per_second"]
    return {"hidden": hidden, "steps": steps, "chars": summary["chars_seen"], "val_bpc": summary["val_bpc"],
            "chars_per_second": cps, "train_minutes": summary["chars_seen"] / cps / 60, "model_dir": model_dir,
            "precision": summary["precision"], "world_size": summary["world_size"],
            "curve": [(h["chars_seen"], h["val_bpc"]) for h in summary["history"]]}


def write_report(runs: list[dict], F) -> None:
    rows = []
    for i, r in enumerate(runs):
        gap = f"{runs[i - 1]['val_bpc'] - r['val_bpc']:+.3f}" if i else ""
        ref = NVIDIA_AMAZON_BPC.get(r["hidden"])
        rows.append([r["hidden"], f"{r['val_bpc']:.3f}", gap, f"{r['chars_per_second']:,.0f}",
                     f"{r['train_minutes']:.1f}", f"{ref:.2f}" if ref else ""])
    lines = [f"Validation BPC (whole split) after {runs[0]['chars']:,} characters, {runs[0]['world_size']} rank(s), "
             f"{runs[0]['precision']}; settings from `{F.flagfile_train or 'train.py defaults'}`.", ""]
    lines += report.table(["hidden", "val BPC", "gap to next smaller", "chars/s", "training minutes",
                           "NVIDIA, full Amazon (about)"], rows, "rrrrrr")
    report.write_markdown(os.path.join(F.out_dir, "results.md"), lines)
    report.write_results(os.path.join(F.out_dir, "results.json"),
                         {"settings": {k: getattr(F, k) for k in ("flagfile_train", "hidden_sizes", "chars", "np",
                                                                 "batch_size_per_worker", "seq_length", "evals",
                                                                 "train_args")},
                          "nvidia_amazon_bpc": NVIDIA_AMAZON_BPC, "runs": runs})

    with report.figure(os.path.join(F.out_dir, "bpc.png"), 2, (10, 4.2), dpi=120, sharey=True) as (fig, axes):
        by_chars, by_time = axes
        for r in runs:
            chars = [c for c, _ in r["curve"]]
            bpc = [b for _, b in r["curve"]]
            by_chars.plot(chars, bpc, marker="o", markersize=3, label=f"{r['hidden']} units")
            by_time.plot([c / r["chars_per_second"] / 60 for c in chars], bpc, marker="o", markersize=3,
                         label=f"{r['hidden']} units")
        by_chars.set_xlabel("characters trained")
        by_chars.set_ylabel("validation bits per character")
        by_time.set_xlabel("training minutes (characters / chars per second)")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle("Model size at equal characters")


def main(argv):
    F = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    try:
        sizes = sorted({int(h) for h in F.hidden_sizes})
    except ValueError:
        sys.exit(f"error: --hidden_sizes must be integers, got {','.join(F.hidden_sizes)}")
    if not sizes or sizes[0] < 1:
        sys.exit(f"error: --hidden_sizes must be positive, got {','.join(F.hidden_sizes) or 'none'}")
    if F.flagfile_train and not os.path.isfile(F.flagfile_train):
        sys.exit(f"error: --flagfile_train {F.flagfile_train} does not exist")
    os.makedirs(F.out_dir, exist_ok=True)
    try:
        runs = [train(h, F) for h in sizes]
    except (ValueError, jobs.JobError) as e:
        sys.exit(f"error: {e}")
    write_report(runs, F)
    for r in runs:
        print(f"[model_size] hidden {r['hidden']}: validation BPC {r['val_bpc']:.3f} after {r['chars']:,} characters "
              f"({r['chars_per_second']:,.0f} chars/s)")
    print(f"[model_size] wrote {F.out_dir}/results.md, results.json, bpc.png")


if __name__ == "__main__":
    flags.DEFINE_string("flagfile_train", "", "train.py flagfile the runs share (data, precision, LR, ...).")
    flags.DEFINE_string("out_dir", "runs/model_size", "Where runs, results.md, results.json and bpc.png go.")
    flags.DEFINE_list("hidden_sizes", ["256", "512", "1024"], "mLSTM sizes to compare.")
    flags.DEFINE_float("chars", 4e6, "Characters every size trains on.", lower_bound=1)
    flags.DEFINE_integer("np", 2, "Processes per run.", lower_bound=1)
    flags.DEFINE_string("hostfile", "", "Hosts of the runs (`host slots=N` lines); empty = localhost.")
    flags.DEFINE_integer("batch_size_per_worker", 32, "Streams per rank.", lower_bound=1)
    flags.DEFINE_integer("seq_length", 256, "Bytes per window.", lower_bound=2)
    flags.DEFINE_integer("evals", 8, "Validation points per run.", lower_bound=1)
    flags.DEFINE_multi_string("train_args", [], "More train.py flags for every run (repeat the flag).")
    app.run(main)
