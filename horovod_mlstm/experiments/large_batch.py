"""The paper's claim at small scale: large batches converge with the schedule, not with naive scaling.

    python -m horovod_mlstm.experiments.large_batch --out_dir runs/large_batch [--data_dir D] \
        [--batches 16,128,1024] [--policies linear,sqrt,schedule,none] [--base_lrs 3e-3,1e-2,3e-2,1e-1] \
        [--cap_multiples 1.5] [--np 1 [--hostfile F]] [--parallel 2]
    # Adasum (not among the default policies) combines the gradients of --np ranks, over MPI:
    python -m horovod_mlstm.experiments.large_batch --policies schedule,adasum --np 2 --parallel 1

1. Tune: at --reference_batch, train with each of --base_lrs (constant after warmup) and keep
   the stable one with the lowest mean validation BPC over its run as the base rate. Naive
   scaling only fails in an instructive way from a rate that is good at the small batch.
2. Scale: at every global batch, train with each policy's peak rate derived from that base:
     linear    base x batch/ref                         (Goyal-style linear scaling)
     sqrt      base x sqrt(batch/ref)
     schedule  the project's recipe: min(base x sqrt(batch/ref), cap x base) for each cap
               of --cap_multiples, linear decay to zero after the warmup
     none      base, whatever the batch (the control: ignore the batch size)
     adasum    base, whatever the batch, linear decay like schedule, and the --np ranks' gradients
               combined by Horovod's Adasum instead of averaged (train.py --gradient_reduction=adasum;
               needs --np a power of 2 from 2, and runs under horovodrun --mpi: Gloo has no Adasum).
               Not a default policy. Its averaging twin is schedule with --cap_multiples 1.
   Every run warms up linearly over its first 10% of steps, and every run sees the same
   number of characters (steps = chars / (batch x seq_length)).

Every run is a train.py job, --parallel of them at once: small-batch runs are bound by per-step
overhead, so two 1-thread runs on 2 cores take about the time of one. Batches larger than
--micro_batch x --np are reached exactly by gradient accumulation (--backward_passes_per_step),
so the experiment runs unchanged on 1 CPU or, with --np and --hostfile, on a cluster.
Validation uses the same --eval_streams streams in every run, so BPC compares across batches.
A run's directory is named by its settings, so runs with identical settings are trained once
(at the reference batch, linear, sqrt and none are the tuning run of the chosen base) and a
rerun continues where an interrupted one stopped.

Outcome of a run, from its validation curve (the untrained model's 8 bits as its start):
  diverged  NaN/inf, or it rose above where it started (worse than guessing uniformly),
            even if it recovered later
  unstable  not diverged, but it rose more than --spike_bits above its best so far
  stable    otherwise (a blow-up that recovers before the first evaluation shows only as a
            high first value: compare the curves)
Writes OUT/results.md (the tuning runs, then batch, policy, peak LR, final BPC, outcome),
OUT/results.json and OUT/curves.png (validation BPC against characters seen, a panel per batch).
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import math
import os
import sys

from absl import app, flags, logging

from horovod_mlstm import hardware, jobs
from horovod_mlstm.experiments import report
from horovod_mlstm.hardware import AUTO
from horovod_mlstm.model import PRECISIONS
from horovod_mlstm.schedule import peak_learning_rate

POLICIES = ("linear", "sqrt", "schedule", "none", "adasum")
DEFAULT_POLICIES = ("linear", "sqrt", "schedule", "none")  # adasum needs --np >= 2 and MPI
UNTRAINED_BPC = 8.0  # a model that guesses every byte uniformly


def peak_lr(policy: str, base_lr: float, batch: int, reference_batch: int, cap_multiple: float) -> float:
    """The peak learning rate a policy gives a batch, from the base rate tuned at reference_batch:
    train.py's own scaling rule, with the schedule's sqrt scaling capped at cap_multiple x base.
    Adasum's combination needs no scaling with the ranks (Horovod): the base at every batch."""
    if policy == "schedule":
        return peak_learning_rate(base_lr, batch, reference_batch, "sqrt", cap_multiple * base_lr)
    if policy == "adasum":
        return peak_learning_rate(base_lr, batch, reference_batch, "none")
    return peak_learning_rate(base_lr, batch, reference_batch, policy)


def outcome(history: list[dict], spike_bits: float) -> str:
    """'diverged', 'unstable' or 'stable' for a validation curve (see the module docstring)."""
    values = [h["val_bpc"] for h in history]
    if not values or any(not math.isfinite(v) or v > UNTRAINED_BPC for v in values):
        return "diverged"
    best = UNTRAINED_BPC
    for v in values:
        if v > best + spike_bits:
            return "unstable"
        best = min(best, v)
    return "stable"


def check_batch(batch: int, F) -> int:
    """Sequences per backward pass per process for `batch`; ValueError if it does not split evenly."""
    per_rank = batch // F.np
    if batch % F.np or per_rank % min(F.micro_batch, per_rank):
        raise ValueError(f"batch {batch} does not split into {F.np} process(es) x micro-batches of {F.micro_batch}")
    return min(F.micro_batch, per_rank)


NONFINITE = "nonfinite.json"  # in a run's directory: its curve, when train.py stopped on non-finite weights


def logged_val_bpc(model_dir: str, chars_per_step: int) -> list[dict]:
    """The validation curve a train.py job wrote to TensorBoard (val/bpc by step), in characters."""
    import tensorflow as tf

    points = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "tensorboard", "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "val/bpc":
                    points[event.step] = float(tf.make_ndarray(value.tensor))
    return [{"chars_seen": step * chars_per_step, "val_bpc": bpc} for step, bpc in sorted(points.items())]


def train(batch: int, lr: float, decay: str, reduction: str, F, data_dir: str) -> dict:
    """One train.py job, or its summary if a job with the same settings already finished.
    reduction "adasum" trains with --gradient_reduction=adasum under horovodrun --mpi."""
    micro = check_batch(batch, F)
    steps = max(2, F.chars // (batch * F.seq_length))
    settings = [f"--data_dir={data_dir}", f"--hidden_size={F.hidden_size}", "--embed_size=32",
                f"--seq_length={F.seq_length}", f"--batch_size_per_worker={micro}",
                f"--backward_passes_per_step={batch // F.np // micro}", f"--train_steps={steps}",
                f"--learning_rate={lr!r}", "--batch_scaling=none", "--max_learning_rate=0",
                f"--warmup_steps={max(1, steps // 10)}", f"--lr_decay={decay}",
                f"--eval_every={max(1, steps // F.evals)}", f"--eval_windows={F.eval_windows}",
                f"--eval_batch_size={max(1, F.eval_streams // F.np)}", "--clip_norm=0",
                f"--precision={hardware.resolve(F.precision)[0]}",  # as run, so a run dir names it
                # Diverging is an outcome to record here, not a reason to stop the job.
                "--divergence_bpc=0", f"--max_skipped_steps={2 * steps}"]
    if reduction != "average":  # only then, so averaging runs keep their settings, hence their directories
        settings.append(f"--gradient_reduction={reduction}")
    name = f"b{batch}_lr{lr:.4g}_{decay}" + ("_adasum" if reduction == "adasum" else "")
    blown_up = os.path.join(jobs.run_dir(F.out_dir, name, settings, F.np), NONFINITE)
    if os.path.exists(blown_up):  # a rerun: that run's outcome is known
        with open(blown_up) as f:
            summary = json.load(f)
    else:
        try:
            model_dir, summary, reused = jobs.run_once(
                F.out_dir, name, settings,
                [f"--log_every={max(1, steps // 4)}", f"--checkpoint_every={steps}", f"--intra_op_threads={F.threads}"],
                f"[large_batch] training batch {batch} at peak LR {lr:.4g} ({decay}, {steps} steps"
                f"{', Adasum' if reduction == 'adasum' else ''})", F.np,
                controller="mpi" if reduction == "adasum" else "gloo", hostfile=F.hostfile)
            if reused:
                logging.info("reusing %s", model_dir)
        except jobs.JobError as e:
            if "weights are not finite" not in str(e):
                raise
            # train.py refuses to checkpoint non-finite weights and exits: the run diverged. Its
            # curve is what it logged to TensorBoard (its last evaluation NaN), kept for reruns.
            history = logged_val_bpc(os.path.dirname(blown_up), batch * F.seq_length)
            summary = {"val_bpc": history[-1]["val_bpc"] if history else math.nan, "history": history}
            with open(blown_up, "w") as f:
                json.dump(summary, f)
            print(f"[large_batch] batch {batch} at peak LR {lr:.4g}: the weights became non-finite (diverged)",
                  flush=True)
    return {"batch": batch, "peak_lr": lr, "steps": steps, "final_bpc": summary["val_bpc"],
            "outcome": outcome(summary["history"], F.spike_bits),
            "curve": [(h["chars_seen"], h["val_bpc"]) for h in summary["history"]]}


def train_all(runs: list[tuple[int, float, str, str]], F, data_dir: str) -> dict:
    """Every distinct (batch, peak LR, decay, reduction) run, --parallel at a time: {run: result}.
    The first failure cancels the runs not yet started and is raised."""
    distinct = list(dict.fromkeys(runs))
    pool = concurrent.futures.ThreadPoolExecutor(F.parallel)
    futures = [pool.submit(train, *run, F, data_dir) for run in distinct]
    try:
        return {run: future.result() for run, future in zip(distinct, futures)}
    finally:
        pool.shutdown(cancel_futures=True)


def tune_base_lr(candidates: list[float], F, data_dir: str) -> tuple[float, list[dict]]:
    """The stable candidate with the lowest mean validation BPC over its run at the reference batch.

    The mean over the curve rewards the rate that learns fastest, not only the one that ends
    lowest: on an easy corpus every rate reaches the same floor and the final value alone
    picks among ties by noise (seen on the built-in corpus, docs/LARGE_BATCH.md).
    """
    done = train_all([(F.reference_batch, lr, "constant", "average") for lr in candidates], F, data_dir)
    runs = [{"policy": "tune", **r} for r in done.values()]
    for r in runs:
        r["mean_bpc"] = sum(b for _, b in r["curve"]) / len(r["curve"]) if r["outcome"] == "stable" else float("nan")
    usable = [r for r in runs if r["outcome"] == "stable"]
    if not usable:
        raise ValueError(f"no base LR in {candidates} trained stably at batch {F.reference_batch}; try smaller ones")
    return min(usable, key=lambda r: r["mean_bpc"])["peak_lr"], runs


def policy_name(policy: str, cap: float | None) -> str:
    return f"schedule, cap {cap:g}x" if policy == "schedule" else policy


def write_report(base_lr: float, tuning: list[dict], results: list[dict], out_dir: str) -> None:
    def shown(r):
        return f"**{r['outcome']}**" if r["outcome"] != "stable" else "stable"

    lines = [f"Base LR tuned at the reference batch: **{base_lr:.4g}**", ""]
    lines += report.table(["tuning: LR at the reference batch", "mean val BPC over the run", "final val BPC",
                           "outcome"],
                          [[f"{r['peak_lr']:.4g}", f"{r['mean_bpc']:.3f}", f"{r['final_bpc']:.3f}", shown(r)]
                           for r in tuning], "rrrl")
    lines.append("")
    lines += report.table(["global batch", "policy", "peak LR", "steps", "final val BPC", "outcome"],
                          [[r["batch"], r["name"], f"{r['peak_lr']:.4g}", r["steps"], f"{r['final_bpc']:.3f}", shown(r)]
                           for r in results], "rlrrrl")
    report.write_markdown(os.path.join(out_dir, "results.md"), lines)
    report.write_results(os.path.join(out_dir, "results.json"), {"base_lr": base_lr, "tuning": tuning, "runs": results})

    batches = sorted({r["batch"] for r in results})
    colors = {"linear": "tab:red", "sqrt": "tab:orange", "schedule": "tab:blue", "none": "tab:gray",
              "adasum": "tab:green"}
    with report.figure(os.path.join(out_dir, "curves.png"), len(batches), (4.2 * len(batches), 4.5),
                       sharey=True) as (fig, axes):
        for ax, batch in zip(axes, batches):
            for i, r in enumerate(r for r in results if r["batch"] == batch):
                xs = [0] + [c for c, _ in r["curve"]]
                ys = [UNTRAINED_BPC] + [b if math.isfinite(b) else float("nan") for _, b in r["curve"]]
                note = "" if r["outcome"] == "stable" else f" ({r['outcome']}"
                if r["outcome"] == "diverged":
                    finite = [y for y in ys if math.isfinite(y)]
                    note += f", up to {max(finite):.0f} bits" if max(finite) > UNTRAINED_BPC else ", NaN"
                ax.plot(xs, ys, color=colors[r["policy"]], marker="osv^D"[i % 5], markersize=3,
                        label=f"{r['name']}: {r['peak_lr']:.3g}" + note + (")" if note else ""))
            steps = next(r["steps"] for r in results if r["batch"] == batch)
            ax.set_title(f"global batch {batch} ({steps} steps)")
            ax.set_xlabel("characters seen")
            ax.set_ylim(0, 9)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("validation bits per character")
        fig.suptitle(f"Same characters at every batch; peak LRs from the base {base_lr:.3g} tuned at the smallest")


def main(argv):
    F = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if not F.policies or not set(F.policies) <= set(POLICIES):
        sys.exit(f"error: --policies must be some of {','.join(POLICIES)}, got {','.join(F.policies) or 'none'}")
    if "adasum" in F.policies and (F.np < 2 or F.np & (F.np - 1)):
        sys.exit(f"error: --policies=adasum needs --np of 2, 4, 8, ... (Adasum combines the gradients of several "
                 f"ranks, a power-of-2 number of them in Horovod), got --np {F.np}")
    try:
        batches = [int(b) for b in F.batches]
        base_lrs = [float(lr) for lr in F.base_lrs]
        caps = [float(c) for c in F.cap_multiples]
    except ValueError as e:
        sys.exit(f"error: --batches must be integers, --base_lrs and --cap_multiples numbers ({e})")
    if not (batches and base_lrs and caps) or any(not x > 0 or math.isinf(x) for x in batches + base_lrs + caps):
        sys.exit("error: --batches, --base_lrs and --cap_multiples must be positive (and not empty)")
    try:
        for batch in [F.reference_batch, *batches]:
            check_batch(batch, F)
    except ValueError as e:
        sys.exit(f"error: {e}")
    os.makedirs(F.out_dir, exist_ok=True)
    data_dir = F.data_dir
    if not data_dir:
        from horovod_mlstm.corpus import prepare_builtin
        from horovod_mlstm.flags import BUILTIN_DATA_DIR

        data_dir = prepare_builtin(os.path.join(jobs.REPO, BUILTIN_DATA_DIR))
    try:
        base_lr, tuning = tune_base_lr(base_lrs, F, data_dir)
        print(f"[large_batch] base LR {base_lr:.4g} (best of {base_lrs} at batch {F.reference_batch})", flush=True)
        if len(base_lrs) > 1 and base_lr in (min(base_lrs), max(base_lrs)):
            print("[large_batch] note: the best base LR is at the edge of --base_lrs; the best rate may lie beyond",
                  flush=True)
        planned = {}  # (batch, policy, cap) -> (batch, peak LR, decay)
        for batch in batches:
            for policy in F.policies:
                for cap in caps if policy == "schedule" else [None]:
                    lr = peak_lr(policy, base_lr, batch, F.reference_batch, cap or 0.0)
                    decay = "linear" if policy in ("schedule", "adasum") else "constant"
                    planned[batch, policy, cap] = (batch, lr, decay, "adasum" if policy == "adasum" else "average")
        done = train_all(list(planned.values()), F, data_dir)
    except (ValueError, jobs.JobError) as e:
        sys.exit(f"error: {e}")
    results = []
    for (batch, policy, cap), run in planned.items():
        results.append({"policy": policy, "name": policy_name(policy, cap), "cap_multiple": cap, **done[run]})
        r = results[-1]
        print(f"[large_batch] batch {batch} {r['name']}: peak LR {r['peak_lr']:.4g}, final BPC {r['final_bpc']:.3f}, "
              f"{r['outcome']}", flush=True)
    write_report(base_lr, tuning, results, F.out_dir)
    print(f"[large_batch] wrote {F.out_dir}/results.md and curves.png")


if __name__ == "__main__":
    flags.DEFINE_string("out_dir", "runs/large_batch", "Where runs, results.md and curves.png go.")
    flags.DEFINE_string("data_dir", "", "Preprocessed shards; empty = the built-in corpus.")
    flags.DEFINE_list("batches", ["16", "128", "1024"], "Global batches (sequences) to compare.")
    flags.DEFINE_list("policies", list(DEFAULT_POLICIES), f"LR policies to compare, of {','.join(POLICIES)}.")
    flags.DEFINE_list("base_lrs", ["3e-3", "1e-2", "3e-2", "1e-1"], "Candidate base LRs, tried at --reference_batch.")
    flags.DEFINE_integer("reference_batch", 16, "The small batch the base LR is tuned at.", lower_bound=1)
    flags.DEFINE_list("cap_multiples", ["1.5"], "schedule policy: caps on the peak LR, as multiples of the base LR "
                      "(several give one schedule run each: the way to find the cap for a batch).")
    flags.DEFINE_integer("chars", 5_000_000, "Training characters per run (the same for every run).", lower_bound=1)
    flags.DEFINE_integer("hidden_size", 128, "mLSTM units.", lower_bound=1)
    flags.DEFINE_enum("precision", AUTO, [AUTO, *PRECISIONS], "train.py's --precision for every run (auto: "
                      "this machine's choice, named in each run's settings).")
    flags.DEFINE_integer("seq_length", 64, "Bytes per window.", lower_bound=1)
    flags.DEFINE_integer("micro_batch", 256, "Most sequences per backward pass per process.", lower_bound=1)
    flags.DEFINE_integer("evals", 8, "Validation points per run.", lower_bound=1)
    flags.DEFINE_integer("eval_streams", 16, "Validation streams, the same in every run.", lower_bound=1)
    flags.DEFINE_integer("eval_windows", 64, "Validation windows per evaluation (0 = the whole split).", lower_bound=0)
    flags.DEFINE_float("spike_bits", 0.5, "A rise of more than this above the best BPC so far marks a run unstable.",
                       lower_bound=0.0)
    flags.DEFINE_integer("parallel", 2, "Runs trained at once (use 1 with --np > 1).", lower_bound=1)
    flags.DEFINE_integer("threads", 1, "TensorFlow intra-op threads per process.", lower_bound=1)
    flags.DEFINE_integer("np", 1, "Processes per run (horovodrun with Gloo when > 1; with MPI for adasum).",
                         lower_bound=1)
    flags.DEFINE_string("hostfile", "", "With --np > 1: horovodrun's hostfile (default: all processes on localhost).")
    app.run(main)
