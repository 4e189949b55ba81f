"""The paper's claim at small scale: large batches converge with the schedule, not with naive scaling.

    python -m horovod_mlstm.experiments.large_batch --out_dir runs/large_batch \
        [--data_dir D] [--batches 32,128,512,2048] [--policies linear,sqrt,schedule] [--chars 1500000]

For every global batch and learning-rate policy, train.py trains the same small mLSTM on the
same number of characters (steps = chars / (batch x seq_length)); batches larger than
--micro_batch x --np are reached exactly with gradient accumulation
(--backward_passes_per_step), so the experiment runs unchanged on 1 CPU or 128 GPUs.
Policies, all from the small-batch rate --learning_rate at --reference_batch:
  linear    peak = lr x batch/ref, no cap, 1 warmup step, constant (Goyal-style naive scaling)
  sqrt      peak = lr x sqrt(batch/ref), no cap, 1 warmup step, constant
  schedule  the project's recipe: sqrt scaling capped at --max_learning_rate, warmup over
            10% of the steps, linear decay to zero
A run diverged if its validation BPC became NaN/inf or ended above where it started
(its first evaluation, or the 8 bits of a uniform guess).
Writes OUT/results.md (batch, policy, peak LR, final BPC, diverged), OUT/results.json and
OUT/curves.png (validation BPC against characters seen, one line per run).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from absl import app, flags, logging

from horovod_mlstm.schedule import peak_learning_rate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLICIES = ("linear", "sqrt", "schedule")


def policy_flags(policy: str, steps: int, max_lr: float) -> list[str]:
    if policy == "linear":
        return ["--batch_scaling=linear", "--max_learning_rate=0", "--warmup_steps=1", "--lr_decay=constant"]
    if policy == "sqrt":
        return ["--batch_scaling=sqrt", "--max_learning_rate=0", "--warmup_steps=1", "--lr_decay=constant"]
    return ["--batch_scaling=sqrt", f"--max_learning_rate={max_lr}", f"--warmup_steps={max(1, steps // 10)}",
            "--lr_decay=linear"]


UNIFORM_BPC = 8.0  # a model that guesses every byte uniformly


def diverged(history: list[dict]) -> bool:
    """NaN/inf anywhere, or the last validation BPC above where the run started (its first
    evaluation, or the 8 bits of a uniform guess, whichever is lower)."""
    values = [h["val_bpc"] for h in history]
    return not values or any(not math.isfinite(v) for v in values) or values[-1] > min(values[0], UNIFORM_BPC)


def run_one(batch: int, policy: str, out_dir: str, data_dir: str, np_: int) -> dict:
    F = flags.FLAGS
    per_pass = F.micro_batch * np_
    if batch % per_pass:
        raise ValueError(f"batch {batch} is not a multiple of --micro_batch x --np = {per_pass}")
    steps = max(2, F.chars // (batch * F.seq_length))
    model_dir = os.path.join(out_dir, f"b{batch}_{policy}")
    args = [sys.executable, os.path.join(REPO, "train.py"), f"--model_dir={model_dir}",
            f"--data_dir={data_dir}", f"--hidden_size={F.hidden_size}", "--embed_size=32",
            f"--seq_length={F.seq_length}", f"--batch_size_per_worker={F.micro_batch}",
            f"--backward_passes_per_step={batch // per_pass}", f"--train_steps={steps}",
            f"--learning_rate={F.learning_rate}", f"--reference_batch={F.reference_batch}",
            f"--eval_every={max(1, steps // F.evals)}", f"--eval_windows={F.eval_windows}",
            f"--log_every={max(1, steps // 4)}", f"--checkpoint_every={steps}", "--clip_norm=0",
            "--intra_op_threads=2", *policy_flags(policy, steps, F.max_learning_rate)]
    if np_ > 1:
        args = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", str(np_)] + args
    if os.path.exists(os.path.join(model_dir, "summary.json")):
        logging.info("reusing %s", model_dir)
    else:
        proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if proc.returncode != 0:
            raise RuntimeError(f"run b{batch} {policy} failed: {proc.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(model_dir, "summary.json")) as f:
        summary = json.load(f)
    peak = peak_learning_rate(F.learning_rate, batch, F.reference_batch,
                              "linear" if policy == "linear" else "sqrt",
                              F.max_learning_rate if policy == "schedule" else None)
    return {"batch": batch, "policy": policy, "peak_lr": peak, "steps": steps,
            "final_bpc": summary["val_bpc"], "diverged": diverged(summary["history"]),
            "curve": [(h["chars_seen"], h["val_bpc"]) for h in summary["history"]]}


def write_report(results: list[dict], out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| global batch | policy | peak LR | steps | final val BPC | diverged |", "|---:|---|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['batch']} | {r['policy']} | {r['peak_lr']:.3g} | {r['steps']} | "
                     f"{r['final_bpc']:.3f} | {'**yes**' if r['diverged'] else 'no'} |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"linear": ":", "sqrt": "--", "schedule": "-"}
    batches = sorted({r["batch"] for r in results})
    colors = dict(zip(batches, plt.cm.viridis([i / max(1, len(batches) - 1) for i in range(len(batches))])))
    for r in results:
        xs = [c for c, _ in r["curve"]]
        ys = [b if math.isfinite(b) else float("nan") for _, b in r["curve"]]
        ax.plot(xs, ys, styles.get(r["policy"], "-"), color=colors[r["batch"]], marker="o", markersize=3,
                label=f"{r['batch']} {r['policy']}" + (" (diverged)" if r["diverged"] else ""))
    ax.set_xlabel("characters seen")
    ax.set_ylabel("validation bits per character")
    ax.set_ylim(top=8.5)
    ax.set_title("Same characters at growing global batch, three learning-rate policies")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=110)
    plt.close(fig)


def main(argv):
    F = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    policies = F.policies.split(",")
    if not set(policies) <= set(POLICIES):
        sys.exit(f"error: --policies must be from {POLICIES}, got {F.policies}")
    try:
        batches = [int(b) for b in F.batches.split(",")]
    except ValueError:
        sys.exit(f"error: --batches must be integers, got {F.batches}")
    os.makedirs(F.out_dir, exist_ok=True)
    data_dir = F.data_dir
    if not data_dir:
        from horovod_mlstm.flags import BUILTIN_DATA_DIR
        from horovod_mlstm.preprocess import prepare_builtin

        data_dir = prepare_builtin(os.path.join(REPO, BUILTIN_DATA_DIR))
    results = []
    try:
        for batch in batches:
            for policy in policies:
                r = run_one(batch, policy, F.out_dir, data_dir, F.np)
                results.append(r)
                print(f"[large_batch] batch {batch} {policy}: peak LR {r['peak_lr']:.3g}, final BPC "
                      f"{r['final_bpc']:.3f}{' DIVERGED' if r['diverged'] else ''}", flush=True)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    write_report(results, F.out_dir)
    print(f"[large_batch] wrote {F.out_dir}/results.md and curves.png")


if __name__ == "__main__":
    flags.DEFINE_string("out_dir", "runs/large_batch", "Where runs, results.md and curves.png go.")
    flags.DEFINE_string("data_dir", "", "Preprocessed shards; empty = the built-in corpus.")
    flags.DEFINE_string("batches", "32,128,512,2048", "Global batches (sequences) to compare.")
    flags.DEFINE_string("policies", ",".join(POLICIES), "LR policies to compare.")
    flags.DEFINE_integer("chars", 1_500_000, "Training characters per run (the same for every run).")
    flags.DEFINE_integer("hidden_size", 128, "mLSTM units.")
    flags.DEFINE_integer("seq_length", 64, "Bytes per window.")
    flags.DEFINE_integer("micro_batch", 32, "Sequences per backward pass per process.")
    flags.DEFINE_float("learning_rate", 2e-3, "The small-batch learning rate, at --reference_batch.")
    flags.DEFINE_integer("reference_batch", 32, "The batch --learning_rate was tuned for.")
    flags.DEFINE_float("max_learning_rate", 6e-3, "schedule policy: cap on the peak LR.")
    flags.DEFINE_integer("evals", 8, "Validation points per run.")
    flags.DEFINE_integer("eval_windows", 8, "Validation windows per evaluation.")
    flags.DEFINE_integer("np", 1, "Processes per run (horovodrun when > 1).")
    app.run(main)
