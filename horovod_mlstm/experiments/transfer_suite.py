"""How sentiment transfer grows with pretraining, against fair baselines (Radford et al. 2017, figure 2).

    python -m horovod_mlstm.experiments.transfer_suite --model_dir M --out_dir O \
        [--sst_dir D] [--imdb_dir D] [--imdb_train N] [--imdb_val N] [--imdb_test N] [--final_imdb_test N|all] \
        [--demo_model_dir D] [--bpc_data_dir D] [--text_prep project|radford] [--seed S]

Systems: every milestone M/milestones/chars-N/ (train.py --milestone_chars) and M itself (its
latest checkpoint), then three baselines on the same splits: the same architecture untrained
(random weights, seeded, saved as a step-0 checkpoint in O/untrained), the synthetic-corpus demo
model (--demo_model_dir; skipped with the reason when absent) and a TF-IDF word uni+bigram logistic
regression.

Tasks: SST (train/dev/test.csv, column `sentence`) and IMDB (train.csv.gz cut by one seeded
stratified order into --imdb_train training and the next --imdb_val validation reviews; the first
--imdb_test of test.csv.gz in another such order, and for M and TF-IDF also the first
--final_imdb_test, `all` being the 25,000). Every model reads each split once (Featurizer.transform_all)
and the project's L1 logistic regression (transfer.fit: C chosen on val) is fit on every readout;
the readout reported as the model's is the one best on val, never on test. --imdb_* 0 (or an empty
--sst_dir / --imdb_dir) leaves a task out.

Features are cached in O/features/ under a digest of what they depend on (checkpoint name and
hashes, the file's hash and which of its rows, the text prep), as are each model's classifiers
(also keyed by --seed, transfer.py's hash and the scikit-learn version) and its validation BPC on
--bpc_data_dir (fixed --bpc_streams x --seq_length streams), so a rerun, or one after a new
milestone, computes only what is new. Writes O/results.json (every number, with sizes, seeds and
wall times), O/results.md, O/accuracy_vs_chars.png and O/bpc_vs_chars.png.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time

import numpy as np
import sklearn
from absl import app, flags

from horovod_mlstm import data, distributed as dist, transfer
from horovod_mlstm.checkpoint import CheckpointError, Checkpointer
from horovod_mlstm.classifier import write_json
from horovod_mlstm.flags import define_common
from horovod_mlstm.inference import CHECKPOINT_KEYS, READOUTS, TEXT_PREPS, Featurizer, file_sha256
from horovod_mlstm.metrics import bpc_and_chars
from horovod_mlstm.model import ModelConfig, build_model
from horovod_mlstm.records import MANIFEST, DataError
from horovod_mlstm.textfiles import InputError
from horovod_mlstm.transfer import fit, read_labelled_csv

CACHE_FORMAT = 1  # version of the feature cache's key
TFIDF_C_GRID = tuple(2.0 ** k for k in range(-2, 9))  # L2 on sparse n-grams wants larger C than L1 on units
TFIDF = "tfidf"
BASELINE_STYLES = {"untrained": ":", "demo": "-.", TFIDF: "--"}


def log(message: str) -> None:
    print(f"[transfer_suite] {message}", flush=True)


# ------------------------------------------------------------------ tasks and splits

@dataclasses.dataclass
class Split:
    """The labelled texts of one split, and what names them for the feature cache."""

    texts: list[str]
    labels: np.ndarray
    source: dict  # the file's size and hash, and which of its rows
    rows: np.ndarray | None = None  # those rows (None: all, in file order)

    def starts(self, other: "Split") -> bool:
        """This split is the first rows of OTHER (same file), so its features are a slice of OTHER's."""
        return (self.rows is not None and other.rows is not None and self.source["file"] == other.source["file"]
                and np.array_equal(other.rows[:len(self.rows)], self.rows))


@dataclasses.dataclass
class Task:
    name: str
    classes: list[str]
    splits: dict[str, Split]  # train, val, test, and optionally final_test (the final model and TF-IDF)


def file_digest(path: str) -> dict:
    return {"file_bytes": os.path.getsize(path), "file_sha256": file_sha256(path)}


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Every row once, each class shuffled by SEED and interleaved so that any prefix keeps the classes'
    proportions: consecutive slices are disjoint stratified samples, and a longer prefix holds a shorter."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    queues = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    share, taken = counts / counts.sum(), np.zeros(len(classes), np.int64)
    order = np.empty(len(labels), np.int64)
    for k in range(len(labels)):
        behind = int(np.argmax((k + 1) * share - taken))  # the class furthest below its share so far
        order[k] = queues[behind][taken[behind]]
        taken[behind] += 1
    return order


def subsample(path: str, texts: list[str], labels: np.ndarray, rows: np.ndarray | None) -> Split:
    """The given rows of a file (None: all of them, in file order)."""
    source = {"file": os.path.abspath(path), **file_digest(path),
              "rows": hashlib.sha256(rows.astype(np.int64).tobytes()).hexdigest() if rows is not None else "all"}
    if rows is None:
        return Split(texts, labels, source)
    return Split([texts[i] for i in rows], labels[rows], source, rows)


def load_sst(directory: str) -> Task:
    files = {"train": "train.csv", "val": "dev.csv", "test": "test.csv"}
    splits, classes = {}, None
    for split, name in files.items():  # train first: its labels define the classes
        path = os.path.join(directory, name)
        texts, labels, classes = read_labelled_csv(path, "sentence", "label", classes)
        splits[split] = subsample(path, texts, labels, None)
    return Task("sst", classes, splits)


def load_imdb(directory: str, n_train: int, n_val: int, n_test: int, final_test: int | None, seed: int) -> Task:
    """Seeded stratified subsamples of the labelled IMDB reviews (final_test None = every test review).

    The test reviews are the first of final_test's, in one order, so a model scored on both reads them once.
    """
    train_path, test_path = os.path.join(directory, "train.csv.gz"), os.path.join(directory, "test.csv.gz")
    texts, labels, classes = read_labelled_csv(train_path, "text", "label")
    if n_train + n_val > len(texts):
        raise InputError(f"{train_path}: {len(texts):,} reviews, fewer than --imdb_train + --imdb_val = "
                         f"{n_train + n_val:,}")
    order = stratified_order(labels, seed)
    splits = {"train": subsample(train_path, texts, labels, order[:n_train]),
              "val": subsample(train_path, texts, labels, order[n_train:n_train + n_val])}
    texts, labels, _ = read_labelled_csv(test_path, "text", "label", classes)
    final_test = final_test or len(texts)
    if final_test < n_test:
        raise InputError(f"--final_imdb_test {final_test:,} is below --imdb_test {n_test:,}; the final test set "
                         "holds the one every model is scored on")
    if final_test > len(texts):
        raise InputError(f"{test_path}: {len(texts):,} reviews, fewer than the {final_test:,} asked for")
    order = stratified_order(labels, seed + 1)  # another file, another order
    splits["test"] = subsample(test_path, texts, labels, order[:n_test])
    if final_test != n_test:
        splits["final_test"] = subsample(test_path, texts, labels, order[:final_test])
    return Task("imdb", classes, splits)


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
    """M's architecture with seeded initial weights, saved as a step-0 checkpoint in OUT/untrained (once)."""
    import tensorflow as tf

    folder = os.path.join(out_dir, "untrained")
    config = ModelConfig.load(model_dir)
    made_from = {"seed": seed, "config": dataclasses.asdict(config)}
    marker = os.path.join(folder, "untrained.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == made_from:
                return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    tf.keras.utils.set_random_seed(seed)
    model = build_model(config)
    config.save(folder)
    Checkpointer(folder, keep=1, model=model).save(0)
    write_json(marker, made_from)
    return folder


def check_model_dir(system: System) -> None:
    """Before any work: the model's config.json reads and it has a checkpoint (restoring comes later)."""
    ModelConfig.load(system.model_dir)
    if not Checkpointer(system.model_dir, writer=False).candidates():
        raise CheckpointError(f"{system.name}: no checkpoint in {system.model_dir}/checkpoints")


def checkpoint_chars(checkpoint: str) -> int | None:
    """Characters a training checkpoint had seen (None for one without the counter, e.g. imported)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(checkpoint)
    key = "chars_seen/.ATTRIBUTES/VARIABLE_VALUE"
    return int(reader.get_tensor(key)) if reader.has_tensor(key) else None


# ------------------------------------------------------------------ features, BPC and the cache

def cached(out_dir: str, kind: str, key: dict, compute, arrays: bool):
    """compute() once per KEY: the value saved as OUT/features/KIND-<digest of KEY>.npz ({name: array})
    or .json (anything else), or computed now and saved. Returns (value, from_cache)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = os.path.join(out_dir, "features", f"{kind}-{digest}" + (".npz" if arrays else ".json"))
    try:
        if os.path.exists(path) and arrays:
            with np.load(path, allow_pickle=False) as saved:
                if json.loads(str(saved["key"])) == key:
                    return {k: saved[k] for k in saved.files if k != "key"}, True
        elif os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved["key"] == key:
                return saved["value"], True
    except (OSError, ValueError, KeyError) as e:
        log(f"{path}: unreadable cache entry ({e}); computing it again")
    value = compute()
    if arrays:
        with open(path + ".tmp", "wb") as f:
            np.savez(f, key=json.dumps(key, sort_keys=True), **value)
        os.replace(path + ".tmp", path)
    else:
        write_json(path, {"key": key, "value": value})
    return value, False


def featurise(featurizer: Featurizer, system: System, task: Task, split: str, out_dir: str) -> tuple[dict, dict]:
    """{readout: features} of one split, and its texts, seconds and texts/s (seconds None when cached)."""
    from tqdm import tqdm

    texts = task.splits[split].texts
    identity = featurizer.identity()
    key = {"format": CACHE_FORMAT, "checkpoint": {k: identity[k] for k in CHECKPOINT_KEYS},
           "source": {k: v for k, v in task.splits[split].source.items() if k != "file"},
           "text_prep": featurizer.text_prep}
    start = time.time()

    def compute():
        with tqdm(total=len(texts), unit="text", desc=f"{system.name} {task.name}/{split}", file=sys.stderr,
                  mininterval=10) as bar:
            return featurizer.transform_all(texts, progress=bar.update)

    features, from_cache = cached(out_dir, f"{task.name}-{split}", key, compute, arrays=True)
    seconds = time.time() - start
    if from_cache:
        log(f"{system.name} {task.name}/{split}: {len(texts):,} texts from the cache")
        return features, {"texts": len(texts), "seconds": None}
    rate = len(texts) / max(seconds, 1e-9)
    log(f"{system.name} {task.name}/{split}: featurised {len(texts):,} texts in {seconds:.0f} s ({rate:,.1f} texts/s)")
    return features, {"texts": len(texts), "seconds": seconds, "texts_per_second": rate}


def validation_bpc(featurizer: Featurizer, system: System, F) -> dict:
    """The model's BPC on the val split of --bpc_data_dir, over the same fixed streams for every model."""
    identity = featurizer.identity()
    manifest = file_sha256(os.path.join(F.bpc_data_dir, MANIFEST))
    key = {"format": CACHE_FORMAT, "checkpoint": {k: identity[k] for k in CHECKPOINT_KEYS},
           "data": {"dir": os.path.abspath(F.bpc_data_dir), "manifest_sha256": manifest},
           "streams": F.bpc_streams, "seq_length": F.seq_length, "windows": F.bpc_windows}

    def compute():
        start = time.time()
        streams = data.split_streams(F.bpc_data_dir, "val", F.bpc_streams, F.seq_length)
        bpc, scored = bpc_and_chars(featurizer.model, streams, F.bpc_windows)
        return {"val_bpc": bpc, "bytes": scored, "seconds": time.time() - start}

    value, from_cache = cached(F.out_dir, "bpc", key, compute, arrays=False)
    log(f"{system.name}: validation BPC {value['val_bpc']:.4f} over {value['bytes']:,} bytes"
        + (" (cached)" if from_cache else f" in {value['seconds']:.0f} s"))
    return value


# ------------------------------------------------------------------ classifiers

def score_readouts(task: Task, features: dict) -> list[dict]:
    """A row per readout: transfer.fit (C on val) plus the final test set where there is one; the row
    with the best val accuracy (the first readout on ties) is marked chosen_on_val."""
    labels = {s: split.labels for s, split in task.splits.items()}
    rows = []
    for readout in READOUTS:
        start = time.time()
        result, classifier = fit({s: features[s][readout] for s in ("train", "val", "test")}, labels, task.classes)
        if "final_test" in features:
            result["final_test_accuracy"] = classifier.score(features["final_test"][readout], labels["final_test"])
        rows.append({"readout": readout, **result, "fit_seconds": time.time() - start})
    best = max(rows, key=lambda r: r["val_accuracy"])  # max keeps the first of equals
    for row in rows:
        row["chosen_on_val"] = row is best
    return rows


def tfidf_rows(task: Task, text_prep: str) -> list[dict]:
    """A word uni+bigram TF-IDF logistic regression (L2, C chosen on val) on the same splits and text prep."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    start = time.time()
    prep = TEXT_PREPS[text_prep][0]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True,
                                 preprocessor=lambda text: prep(text).lower())
    x = {"train": vectorizer.fit_transform(task.splits["train"].texts)}
    x.update({s: vectorizer.transform(split.texts) for s, split in task.splits.items() if s != "train"})
    y = {s: split.labels for s, split in task.splits.items()}
    fits = [(c, LogisticRegression(C=c, solver="liblinear", max_iter=1000).fit(x["train"], y["train"]))
            for c in TFIDF_C_GRID]
    c, best = max(fits, key=lambda f: f[1].score(x["val"], y["val"]))
    row = {"system": TFIDF, "kind": "baseline", "chars": None, "task": task.name, "readout": "word 1-2 grams",
           "C": c, "features": len(vectorizer.vocabulary_), "chosen_on_val": True,
           **{f"{s}_accuracy": best.score(x[s], y[s]) for s in x}, "fit_seconds": time.time() - start}
    log(f"{TFIDF} {task.name}: test accuracy {row['test_accuracy']:.4f} (C={c:g} on val, {row['features']:,} n-grams)")
    return [row]


# ------------------------------------------------------------------ report

def percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f}"


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
        lines += [f"## {task} (" + ", ".join(f"{s} {v['size']:,}" for s, v in splits.items()) + ")", "",
                  "| model | characters | val BPC | " + " | ".join(READOUTS) + " | chosen on val | test accuracy |"
                  + (f" on {final['size']:,} test texts |" if final else ""),
                  "|---|---:|---:|" + "---:|" * len(READOUTS) + "---|---:|" + ("---:|" if final else "")]
        by_system = {}
        for row in results["rows"]:
            if row["task"] == task:
                by_system.setdefault(row["system"], []).append(row)
        for name, rows in by_system.items():
            chosen = next(r for r in rows if r["chosen_on_val"])
            if name == TFIDF:
                cells, how = [""] * len(READOUTS), f"TF-IDF (C={chosen['C']:g}, {chosen['features']:,} n-grams)"
            else:
                cells = [("**{}** ({})" if r["chosen_on_val"] else "{} ({})").format(
                    percent(r["test_accuracy"]), percent(r["val_accuracy"])) for r in rows]
                how = f"{chosen['readout']} (C={chosen['C']:g})"
            chars = "" if rows[0]["chars"] is None else f"{rows[0]['chars']:,}"
            lines.append(f"| {name} | {chars} | {bpc.get(name, '')} | " + " | ".join(cells)
                         + f" | {how} | {percent(chosen['test_accuracy'])} |"
                         + (f" {percent(chosen.get('final_test_accuracy'))} |" if final else ""))
        lines.append("")
    if results["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{s['system']} ({s['reason']})" for s in results["skipped"]) + ".", ""]
    lines.append(f"Wall time {results['wall_seconds'] / 60:.1f} min; every number, size, seed and time is in "
                 "results.json.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(results: dict, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [s for s in results["systems"] if s["kind"] != "baseline" and s["chars"]]
    colors = dict(zip(results["tasks"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    for task, color in colors.items():
        chosen = {r["system"]: r for r in results["rows"] if r["task"] == task and r["chosen_on_val"]}
        points = sorted((s["chars"], chosen[s["name"]]["test_accuracy"]) for s in curve)
        if points:
            ax.plot(*zip(*points), marker="o", color=color, label=f"{task}: pretrained (readout chosen on val)")
        final = next((s for s in curve if s["kind"] == "final"), None)
        if final and "final_test_accuracy" in chosen.get("final", {}):
            ax.plot(final["chars"], chosen["final"]["final_test_accuracy"], marker="*", markersize=12, color=color,
                    linestyle="none", label=f"{task}: final model on {results['tasks'][task]['final_test']['size']:,} "
                                            "test texts")
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
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_vs_chars.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "bpc_vs_chars.png"), dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ main

def load_tasks(F) -> list[Task]:
    """The labelled splits, read (and checked) before any model is."""
    for name in ("sst_dir", "imdb_dir", "bpc_data_dir"):
        if getattr(F, name) and not os.path.isdir(getattr(F, name)):
            raise InputError(f"--{name} {getattr(F, name)}: no such directory")
    if F.bpc_data_dir:
        data.check_split(F.bpc_data_dir, "val", F.bpc_streams, F.seq_length)
    sizes = {name: getattr(F, name) for name in ("imdb_train", "imdb_val", "imdb_test")}
    if F.final_imdb_test == "all":
        final_test = None
    elif re.fullmatch(r"\d+", F.final_imdb_test):
        final_test = int(F.final_imdb_test)
    else:
        raise InputError(f"--final_imdb_test must be a number of reviews or 'all', got {F.final_imdb_test!r}")
    tasks = [load_sst(F.sst_dir)] if F.sst_dir else []
    if F.imdb_dir and all(sizes.values()):
        tasks.append(load_imdb(F.imdb_dir, *sizes.values(), final_test, F.seed))
    if not tasks:
        raise InputError("no task: give --sst_dir, or --imdb_dir with --imdb_train, --imdb_val and --imdb_test above 0")
    return tasks


def score_system(system: System, tasks: list[Task], F) -> tuple[dict, list[dict]]:
    """Features (one pass per split), classifiers and BPC of one model: (its summary, its rows)."""
    featurizer = Featurizer(system.model_dir, F.text_prep, batch_size=F.batch_size_per_worker, chunk=F.seq_length)
    identity = featurizer.identity()
    if system.kind == "final":
        system.chars = checkpoint_chars(featurizer.checkpoint)
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
        key = {"format": CACHE_FORMAT, "checkpoint": {k: identity[k] for k in CHECKPOINT_KEYS},
               "sources": {s: {k: v for k, v in task.splits[s].source.items() if k != "file"} for s in features},
               "text_prep": F.text_prep, "seed": F.seed, "transfer_py": file_digest(transfer.__file__),
               "sklearn": sklearn.__version__}
        fitted, from_cache = cached(F.out_dir, f"fits-{task.name}", key,
                                    lambda: score_readouts(task, features), arrays=False)
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
        if not os.path.isfile(os.path.join(F.model_dir, "config.json")):
            raise InputError(f"--model_dir {F.model_dir}: no trained model there (missing config.json)")
        tasks = load_tasks(F)
        os.makedirs(os.path.join(F.out_dir, "features"), exist_ok=True)
        systems, skipped = pretrained_systems(F.model_dir)
        systems.append(System("untrained", "baseline", untrained_model_dir(F.model_dir, F.out_dir, F.seed)))
        if F.demo_model_dir and os.path.isfile(os.path.join(F.demo_model_dir, "config.json")):
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
    except (CheckpointError, DataError, OSError, ValueError) as e:  # InputError is a ValueError
        sys.exit(f"error: {e}")
    for task in tasks:
        rows += tfidf_rows(task, F.text_prep)
    settings = {name: F[name].value for name in
                ("model_dir", "out_dir", "sst_dir", "imdb_dir", "imdb_train", "imdb_val", "imdb_test",
                 "final_imdb_test", "demo_model_dir", "bpc_data_dir", "bpc_streams", "bpc_windows", "text_prep",
                 "seed", "batch_size_per_worker", "seq_length")}
    results = {"settings": settings,
               "tasks": {t.name: {s: {"size": int(split.labels.size), "classes": t.classes, **split.source}
                                  for s, split in t.splits.items()} for t in tasks},
               "systems": summaries, "skipped": skipped, "rows": rows, "wall_seconds": time.time() - start}
    write_json(os.path.join(F.out_dir, "results.json"), results)
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
