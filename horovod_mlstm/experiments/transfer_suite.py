"""How sentiment transfer grows with pretraining, against fair baselines (Radford et al. 2017, figure 2).

    python -m horovod_mlstm.experiments.transfer_suite --model_dir M --out_dir O \
        [--sst_dir D] [--imdb_dir D] [--imdb_train N] [--imdb_val N] [--imdb_test N] [--final_imdb_test N|all] \
        [--demo_model_dir D] [--bpc_data_dir D] [--text_prep project|radford] [--seed S]

Systems: every milestone M/milestones/chars-N/ (train.py --milestone_chars) and M itself (its
latest checkpoint), then three baselines on the same splits: the same architecture untrained
(random weights, seeded, written as a model dir O/untrained), the synthetic-corpus demo model
(--demo_model_dir; skipped with the reason when absent) and TF-IDF (transfer.tfidf_baseline).

Tasks (horovod_mlstm.tasks): SST, and IMDB in seeded stratified subsamples (--imdb_train training
and the next --imdb_val validation reviews of train.csv.gz; the first --imdb_test of test.csv.gz,
and for M and TF-IDF also the first --final_imdb_test, `all` being the 25,000). Every model reads
each split once (Featurizer.transform_all gives all four plain readouts, SUITE_READOUTS) and
transfer.fit_readouts fits the project's L1 logistic regression on each readout with C chosen on
validation; the readout reported as the model's is the one best on validation, never on test.
concat_hidden, which transfer --readout auto also tries, is left out: its 3 x hidden-unit fits
would multiply the suite's slowest part (the L1 fits on weak features, minutes per C) for every
model and task. --imdb_* 0 (or an empty --sst_dir / --imdb_dir) leaves a task out.

Each model's features of each split, its classifier fits and its validation BPC on --bpc_data_dir
(fixed --bpc_streams x --seq_length streams) are cached in O/features/<model>/ by the feature
cache (horovod_mlstm.features: keyed by the checkpoint's identity, the input file's hash and rows,
the text prep; the fits also by --seed, transfer.py's hash and the scikit-learn version), so a
rerun, or one after a new milestone, computes only what is new, and one after the final model
trained on says why it recomputes. Writes O/results.json (every number, with sizes, seeds and
wall times), O/results.md, O/accuracy_vs_chars.png and O/bpc_vs_chars.png (experiments.report).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import sys
import time

import sklearn
from absl import app, flags

from horovod_mlstm import data, distributed as dist, features as feature_cache, files, modeldir, transfer
from horovod_mlstm.checkpoint import CheckpointError, Checkpointer
from horovod_mlstm.experiments import report
from horovod_mlstm.flags import define_common
from horovod_mlstm.inference import CONCAT, READOUTS, TEXT_PREPS, Featurizer
from horovod_mlstm.metrics import bpc_and_chars
from horovod_mlstm.model import build_model
from horovod_mlstm.records import MANIFEST, DataError
from horovod_mlstm.tasks import SPLITS, Task, TaskError, load_imdb, load_sst

TFIDF = "tfidf"
SUITE_READOUTS = tuple(r for r in READOUTS if r != CONCAT)  # the table's columns; see the docstring for why
BASELINE_STYLES = {"untrained": ":", "demo": "-.", TFIDF: "--"}


def log(message: str) -> None:
    print(f"[transfer_suite] {message}", flush=True)


# ------------------------------------------------------------------ systems

@dataclasses.dataclass
class System:
    name: str
    kind: str  # milestone, final or baseline
    model_dir: str
    chars: int | None = None  # pretraining characters seen (None: not a point on the learning curve)


def pretrained_systems(model_dir: str) -> tuple[list[System], list[dict]]:
    """M's milestones by characters, then M itself; milestones still being written are skipped (and said so)."""
    systems, skipped = [], []
    for folder in glob.glob(os.path.join(model_dir, "milestones", "chars-*")):
        if not re.fullmatch(r"chars-\d+", os.path.basename(folder)):
            continue
        try:
            with open(os.path.join(folder, "milestone.json")) as f:
                chars = int(json.load(f)["chars_seen"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            skipped.append({"system": os.path.basename(folder), "reason": f"no readable milestone.json ({e})"})
            continue
        systems.append(System(os.path.basename(folder), "milestone", folder, chars))
    systems.sort(key=lambda s: s.chars)
    return systems + [System("final", "final", model_dir)], skipped


def untrained_model_dir(model_dir: str, out_dir: str, seed: int) -> str:
    """M's architecture with seeded initial weights, written as the model dir OUT/untrained (once per seed
    and architecture)."""
    import tensorflow as tf

    folder = os.path.join(out_dir, "untrained")
    made_from = {"seed": seed, "config": dataclasses.asdict(modeldir.read_config(model_dir))}
    try:
        with open(os.path.join(folder, "untrained.json")) as f:
            if json.load(f) == made_from:
                return folder
    except (OSError, ValueError):
        pass  # none yet, or not readable: written anew
    tf.keras.utils.set_random_seed(seed)
    return modeldir.write_model(folder, build_model(modeldir.read_config(model_dir)), 0, "untrained.json", made_from)


def check_model_dir(system: System) -> None:
    """Before any work: the model's config.json reads and it has a checkpoint (restoring comes later)."""
    modeldir.read_config(system.model_dir)
    if not Checkpointer(system.model_dir, writer=False).candidates():
        raise CheckpointError(f"{system.name}: no checkpoint in {system.model_dir}/checkpoints")


# ------------------------------------------------------------------ features, BPC and fits, cached

def cache_path(out_dir: str, system: System, name: str) -> str:
    folder = os.path.join(out_dir, "features", system.name)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def featurise(featurizer: Featurizer, system: System, task: Task, split: str, out_dir: str) -> tuple[dict, dict]:
    """{readout: features} of one split, and its texts, seconds and texts/s (seconds None when cached)."""
    from tqdm import tqdm

    texts = task.splits[split].texts
    key = feature_cache.key(featurizer.identity(), featurizer.text_prep, SUITE_READOUTS,
                            {split: task.splits[split].source})
    start = time.time()

    def compute():
        with tqdm(total=len(texts), unit="text", desc=f"{system.name} {task.name}/{split}", file=sys.stderr,
                  mininterval=10) as bar:
            return {split: featurizer.transform_all(texts, bar.update, SUITE_READOUTS)}

    features, from_cache = feature_cache.cached(cache_path(out_dir, system, f"{task.name}-{split}.npz"), key, compute)
    seconds = time.time() - start
    if from_cache:
        log(f"{system.name} {task.name}/{split}: {len(texts):,} texts from the cache")
        return features[split], {"texts": len(texts), "seconds": None}
    rate = len(texts) / max(seconds, 1e-9)
    log(f"{system.name} {task.name}/{split}: featurised {len(texts):,} texts in {seconds:.0f} s ({rate:,.1f} texts/s)")
    return features[split], {"texts": len(texts), "seconds": seconds, "texts_per_second": rate}


def validation_bpc(featurizer: Featurizer, system: System, F) -> dict:
    """The model's BPC on the val split of --bpc_data_dir, over the same fixed streams for every model."""
    identity = featurizer.identity()
    key = {"format": feature_cache.FORMAT, "checkpoint": {k: identity[k] for k in modeldir.IDENTITY_KEYS},
           "data_manifest_sha256": files.sha256(os.path.join(F.bpc_data_dir, MANIFEST)),
           "streams": F.bpc_streams, "seq_length": F.seq_length, "windows": F.bpc_windows}

    def compute():
        start = time.time()
        streams = data.split_streams(F.bpc_data_dir, "val", F.bpc_streams, F.seq_length)
        bpc, scored = bpc_and_chars(featurizer.model, streams, F.bpc_windows)
        return {"val_bpc": bpc, "bytes": scored, "seconds": time.time() - start}

    value, from_cache = feature_cache.cached_json(cache_path(F.out_dir, system, "bpc.json"), key, compute)
    log(f"{system.name}: validation BPC {value['val_bpc']:.4f} over {value['bytes']:,} bytes"
        + (" (cached)" if from_cache else f" in {value['seconds']:.0f} s"))
    return value


def score_readouts(task: Task, features: dict) -> list[dict]:
    """A row per readout: transfer.fit_readouts (C on val) plus the final test set where there is one; the
    readout with the best val accuracy (the first on ties) is marked chosen_on_val."""
    labels = {s: split.labels for s, split in task.splits.items()}
    fits, chosen = transfer.fit_readouts({s: features[s] for s in SPLITS}, labels, task.classes)
    rows = []
    for readout, (result, pipeline) in fits.items():
        if "final_test" in features:
            result["final_test_accuracy"] = pipeline.score(features["final_test"][readout], labels["final_test"])
        rows.append({"readout": readout, **result, "chosen_on_val": readout == chosen})
    return rows


def tfidf_rows(task: Task, text_prep: str) -> list[dict]:
    """transfer.tfidf_baseline on the task's splits, as the suite's row."""
    result = transfer.tfidf_baseline({s: split.texts for s, split in task.splits.items()},
                                     {s: split.labels for s, split in task.splits.items()}, text_prep)
    row = {"system": TFIDF, "kind": "baseline", "chars": None, "task": task.name, "readout": "word 1-2 grams",
           "chosen_on_val": True, **result}
    log(f"{TFIDF} {task.name}: test accuracy {row['test_accuracy']:.4f} (C={row['C']:g} on val, "
        f"{row['features']:,} n-grams)")
    return [row]


# ------------------------------------------------------------------ report

def write_markdown(results: dict, path: str) -> None:
    """A table per task: a row per model (milestones, final, baselines), test accuracy per readout."""
    bpc = {s["name"]: f"{s['bpc']['val_bpc']:.3f}" for s in results["systems"] if s.get("bpc")}
    settings = results["settings"]
    lines = ["# Transfer suite", "", f"Model `{settings['model_dir']}`, text prep `{settings['text_prep']}`, seed "
             f"{settings['seed']}. Test accuracy (%) of the L1 logistic regression on each readout, validation "
             "accuracy in brackets; the model's number is its readout with the best validation accuracy (**bold**), "
             "never chosen on test. TF-IDF: word uni+bigrams, L2 logistic regression, C chosen on validation.", ""]
    for task, splits in results["tasks"].items():
        final = splits.get("final_test")
        by_system = {}
        for row in results["rows"]:
            if row["task"] == task:
                by_system.setdefault(row["system"], []).append(row)
        cells = []
        for name, rows in by_system.items():
            chosen = next(r for r in rows if r["chosen_on_val"])
            if name == TFIDF:
                readouts = [""] * len(SUITE_READOUTS)
                how = f"TF-IDF (C={chosen['C']:g}, {chosen['features']:,} n-grams)"
            else:
                readouts = [("**{}** ({})" if r["chosen_on_val"] else "{} ({})").format(
                    report.percent(r["test_accuracy"]), report.percent(r["val_accuracy"])) for r in rows]
                how = f"{chosen['readout']} (C={chosen['C']:g})"
            chars = "" if rows[0]["chars"] is None else f"{rows[0]['chars']:,}"
            cells.append([name, chars, bpc.get(name, ""), *readouts, how, report.percent(chosen["test_accuracy"])]
                         + ([report.percent(chosen.get("final_test_accuracy"))] if final else []))
        lines += [f"## {task} (" + ", ".join(f"{s} {v['size']:,}" for s, v in splits.items()) + ")", ""]
        lines += report.table(["model", "characters", "val BPC", *SUITE_READOUTS, "chosen on val", "test accuracy"]
                              + ([f"on {final['size']:,} test texts"] if final else []),
                              cells, "lrr" + "r" * len(SUITE_READOUTS) + "lr" + ("r" if final else ""))
        lines.append("")
    if results["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{s['system']} ({s['reason']})" for s in results["skipped"]) + ".", ""]
    lines.append(f"Wall time {results['wall_seconds'] / 60:.1f} min; every number, size, seed and time is in "
                 "results.json.")
    report.write_markdown(path, lines)


def plot(results: dict, out_dir: str) -> None:
    curve = [s for s in results["systems"] if s["kind"] != "baseline" and s["chars"]]
    with report.figure(os.path.join(out_dir, "accuracy_vs_chars.png"), size=(9.5, 4.8)) as (fig, (ax,)):
        colors = dict(zip(results["tasks"], report.pyplot().rcParams["axes.prop_cycle"].by_key()["color"]))
        for task, color in colors.items():
            chosen = {r["system"]: r for r in results["rows"] if r["task"] == task and r["chosen_on_val"]}
            points = sorted((s["chars"], chosen[s["name"]]["test_accuracy"]) for s in curve)
            if points:
                ax.plot(*zip(*points), marker="o", color=color, label=f"{task}: pretrained (readout chosen on val)")
            final = next((s for s in curve if s["kind"] == "final"), None)
            if final and "final_test_accuracy" in chosen.get("final", {}):
                ax.plot(final["chars"], chosen["final"]["final_test_accuracy"], marker="*", markersize=12,
                        color=color, linestyle="none",
                        label=f"{task}: final model on {results['tasks'][task]['final_test']['size']:,} test texts")
            for name, style in BASELINE_STYLES.items():
                if name in chosen:
                    ax.axhline(chosen[name]["test_accuracy"], color=color, linestyle=style, linewidth=1.2,
                               label=f"{task}: {name}")
        ax.set_xscale("log")
        ax.set_xlabel("pretraining characters")
        ax.set_ylabel("test accuracy")
        ax.set_title("Sentiment transfer against pretraining (L1 logistic regression)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3)

    with report.figure(os.path.join(out_dir, "bpc_vs_chars.png")) as (fig, (ax,)):
        points = sorted((s["chars"], s["bpc"]["val_bpc"]) for s in curve if s.get("bpc"))
        if points:
            ax.plot(*zip(*points), marker="o")
        else:
            ax.text(0.5, 0.5, "no --bpc_data_dir given", ha="center", transform=ax.transAxes)
        ax.set_xscale("log")
        ax.set_xlabel("pretraining characters")
        ax.set_ylabel("validation bits per character")
        ax.set_title(f"Validation BPC on {results['settings']['bpc_data_dir'] or '(none)'}")
        ax.grid(alpha=0.3)


# ------------------------------------------------------------------ main

def load_tasks(F) -> list[Task]:
    """The labelled splits, read (and checked) before any model is."""
    for name in ("sst_dir", "imdb_dir", "bpc_data_dir"):
        if getattr(F, name) and not os.path.isdir(getattr(F, name)):
            raise TaskError(f"--{name} {getattr(F, name)}: no such directory")
    if F.bpc_data_dir:
        data.check_split(F.bpc_data_dir, "val", F.bpc_streams, F.seq_length)
    sizes = {name: getattr(F, name) for name in ("imdb_train", "imdb_val", "imdb_test")}
    if F.final_imdb_test == "all":
        final_test = None
    elif re.fullmatch(r"\d+", F.final_imdb_test):
        final_test = int(F.final_imdb_test)
    else:
        raise TaskError(f"--final_imdb_test must be a number of reviews or 'all', got {F.final_imdb_test!r}")
    tasks = [load_sst(F.sst_dir)] if F.sst_dir else []
    if F.imdb_dir and all(sizes.values()):
        tasks.append(load_imdb(F.imdb_dir, *sizes.values(), final_test, F.seed))
    if not tasks:
        raise TaskError("no task: give --sst_dir, or --imdb_dir with --imdb_train, --imdb_val and --imdb_test above 0")
    return tasks


def score_system(system: System, tasks: list[Task], F) -> tuple[dict, list[dict]]:
    """Features (one pass per split), classifiers and BPC of one model: (its summary, its rows)."""
    featurizer = Featurizer(system.model_dir, F.text_prep, batch_size=F.batch_size_per_worker, chunk=F.seq_length)
    identity = featurizer.identity()
    if system.kind == "final":
        system.chars = modeldir.checkpoint_value(featurizer.checkpoint, "chars_seen")
    summary = {**dataclasses.asdict(system), "checkpoint": identity, "featurised": {}}
    rows = []
    for task in tasks:
        # The full test set is for the final model (and TF-IDF, which costs seconds): 25,000 reviews take
        # a 512-unit model 15-30 minutes here, and the baselines are compared on the shared test rows.
        splits = [s for s in task.splits if s != "final_test" or system.kind == "final"]
        sliced = "final_test" in splits and task.splits["test"].starts(task.splits["final_test"])
        features = {}
        for split in splits:
            if split == "test" and sliced:
                continue
            features[split], summary["featurised"][f"{task.name}/{split}"] = featurise(featurizer, system, task, split,
                                                                                       F.out_dir)
        if sliced:
            size = task.splits["test"].labels.size
            features["test"] = {r: values[:size] for r, values in features["final_test"].items()}
            summary["featurised"][f"{task.name}/test"] = {"texts": size, "sliced_from": "final_test"}
        # L1 fits on weak features (early milestones, untrained) take minutes per C: cached like the features.
        key = {**feature_cache.key(identity, F.text_prep, SUITE_READOUTS,
                                   {s: task.splits[s].source for s in features}),
               "seed": F.seed, "transfer_py_sha256": files.sha256(transfer.__file__), "sklearn": sklearn.__version__}
        fitted, from_cache = feature_cache.cached_json(cache_path(F.out_dir, system, f"fits-{task.name}.json"), key,
                                                       lambda: score_readouts(task, features))
        task_rows = [{"system": system.name, "kind": system.kind, "chars": system.chars, "task": task.name, **r}
                     for r in fitted]
        rows += task_rows
        chosen = next(r for r in task_rows if r["chosen_on_val"])
        took = "fits from the cache" if from_cache else f"fits {sum(r['fit_seconds'] for r in task_rows):.0f} s"
        log(f"{system.name} {task.name}: test accuracy {chosen['test_accuracy']:.4f} with {chosen['readout']} "
            f"(chosen on val, {chosen['val_accuracy']:.4f}; {took})"
            + (f"; {chosen['final_test_accuracy']:.4f} on {task.splits['final_test'].labels.size:,} test texts"
               if "final_test_accuracy" in chosen else ""))
    if F.bpc_data_dir and system.kind != "baseline":
        summary["bpc"] = validation_bpc(featurizer, system, F)
    return summary, rows


def main(argv):
    F = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if F.data_dir:
        sys.exit("error: --data_dir is not read here; the corpus for validation BPC is --bpc_data_dir")
    start = time.time()
    dist.init(F.intra_op_threads, F.inter_op_threads)
    try:
        if not os.path.isfile(os.path.join(F.model_dir, modeldir.CONFIG)):
            raise TaskError(f"--model_dir {F.model_dir}: no trained model there (missing {modeldir.CONFIG})")
        tasks = load_tasks(F)
        os.makedirs(F.out_dir, exist_ok=True)
        systems, skipped = pretrained_systems(F.model_dir)
        systems.append(System("untrained", "baseline", untrained_model_dir(F.model_dir, F.out_dir, F.seed)))
        if F.demo_model_dir and os.path.isfile(os.path.join(F.demo_model_dir, modeldir.CONFIG)):
            systems.append(System("demo", "baseline", F.demo_model_dir))
        else:
            skipped.append({"system": "demo", "reason": f"no trained model in --demo_model_dir {F.demo_model_dir!r} "
                                                        "(make train writes one to runs/cpu_demo)"})
        for s in skipped:
            log(f"skipping {s['system']}: {s['reason']}")
        for system in systems:
            check_model_dir(system)
        summaries, rows = [], []
        for system in systems:
            summary, system_rows = score_system(system, tasks, F)
            summaries.append(summary)
            rows += system_rows
    except (CheckpointError, DataError, OSError, ValueError) as e:  # TaskError is a ValueError
        sys.exit(f"error: {e}")
    for task in tasks:
        rows += tfidf_rows(task, F.text_prep)
    settings = {name: F[name].value for name in
                ("model_dir", "out_dir", "sst_dir", "imdb_dir", "imdb_train", "imdb_val", "imdb_test",
                 "final_imdb_test", "demo_model_dir", "bpc_data_dir", "bpc_streams", "bpc_windows", "text_prep",
                 "seed", "batch_size_per_worker", "seq_length")}
    results = {"settings": settings,
               "tasks": {t.name: {s: {"size": int(split.labels.size), "classes": t.classes,
                                      "file": os.path.abspath(split.path), **split.source}
                                  for s, split in t.splits.items()} for t in tasks},
               "systems": summaries, "skipped": skipped, "rows": rows, "wall_seconds": time.time() - start}
    report.write_results(os.path.join(F.out_dir, "results.json"), results)
    write_markdown(results, os.path.join(F.out_dir, "results.md"))
    plot(results, F.out_dir)
    log(f"wrote {F.out_dir}/results.md, results.json, accuracy_vs_chars.png and bpc_vs_chars.png "
        f"in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    define_common()
    flags.DEFINE_string("out_dir", "runs/transfer_suite", "Where results, figures, features/ and untrained/ go.")
    flags.DEFINE_string("sst_dir", "../shared/data/sst", "SST's train/dev/test.csv; empty = leave SST out.")
    flags.DEFINE_string("imdb_dir", "../shared/data/imdb", "IMDB's train/test.csv.gz; empty = leave IMDB out.")
    flags.DEFINE_integer("imdb_train", 2000, "IMDB training reviews (from train.csv.gz).", lower_bound=0)
    flags.DEFINE_integer("imdb_val", 1000, "IMDB validation reviews (from train.csv.gz, none of the training ones).",
                         lower_bound=0)
    flags.DEFINE_integer("imdb_test", 2000, "IMDB test reviews every model is scored on (from test.csv.gz).",
                         lower_bound=0)
    flags.DEFINE_string("final_imdb_test", "all", "IMDB test reviews the final model and TF-IDF are also "
                        "scored on: a number, or all (25,000).")
    flags.DEFINE_string("demo_model_dir", "runs/cpu_demo", "The synthetic-corpus demo model (make train); skipped "
                        "with the reason when absent.")
    flags.DEFINE_string("bpc_data_dir", "", "Preprocessed data (preprocess output) whose val split gives each "
                        "model's validation BPC; empty = no BPC.")
    flags.DEFINE_integer("bpc_streams", 32, "Validation streams (of --seq_length windows), the same for every model.",
                         lower_bound=1)
    flags.DEFINE_integer("bpc_windows", 0, "Validation windows per stream; 0 = the whole split.", lower_bound=0)
    flags.DEFINE_enum("text_prep", "project", list(TEXT_PREPS), "How texts are framed for the models (and cleaned "
                      "for TF-IDF): inference.TEXT_PREPS.")
    app.run(main)
