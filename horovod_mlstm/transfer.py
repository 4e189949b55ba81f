"""Transfer (Radford et al. 2017): features of a trained model -> L1 logistic regression, saved for classify.

    python -m horovod_mlstm.transfer --model_dir M --train train.csv --val dev.csv --test test.csv \
        [--text_column sentence --label_column label] [--text_prep project|radford] \
        [--readout auto|final_cell|final_hidden|mean_hidden|max_hidden|concat_hidden] [--output_dir O] \
        [--features F.npz]

Each text is featurised by inference.Featurizer, streamed from its file in windows. An
L1-regularised logistic regression is fit on the standardised training features for each strength C
on a grid; the C with the best validation accuracy is kept and scored on the test set. --readout
auto (the default) does that for each of the five readouts (one featurising pass gives them all;
concat_hidden, final, mean and max hidden side by side, is joined from the other three) and keeps
the readout with the best validation accuracy, never looking at test. Two classes:
liblinear, and the unit with the largest |weight| is the candidate "sentiment neuron" (a
one-feature logistic regression on it alone shows how much it carries). More classes: multinomial
L1 (saga). Writes O/results.json, O/classifier.{json,npz} (read by classify), and
O/top_unit_histogram.png (two classes) or O/confusion_matrix.png (more).

The features of every split stay in memory for scikit-learn: texts x hidden float32 per readout
kept (three for concat_hidden; seven with auto), whatever else is streamed. --features caches the
readouts concat_hidden is joined from, not the join.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import numpy as np
from absl import app, flags, logging

from horovod_mlstm import distributed as dist, features as feature_cache, files
from horovod_mlstm.checkpoint import CheckpointError
from horovod_mlstm.classifier import Classifier
from horovod_mlstm.flags import CommonConfig, define_common
from horovod_mlstm.inference import (AUTO, CONCAT, CONCAT_PARTS, READOUTS, TEXT_PREPS, Featurizer,
                                     define_featurizer_flags, is_empty)
from horovod_mlstm.modeldir import IDENTITY_KEYS
from horovod_mlstm.tasks import SPLITS, Task, csv_task, overlap_warnings

# Tops out at 2^0 like Radford et al.'s train_with_reg_cv (2^-8..2^0). Larger C picked only weak
# features (untrained, the first milestones) and cost 50-200 s per liblinear fit on SST at 512 units
# (C=2: 53 s, C=4: 205 s, measured for the transfer suite), against seconds for C <= 1.
C_GRID = tuple(2.0 ** k for k in range(-6, 1))
TFIDF_C_GRID = tuple(2.0 ** k for k in range(-2, 9))  # L2 on sparse n-grams wants larger C than L1 on units


def _logistic_regression(c: float, classes: int):
    from sklearn.linear_model import LogisticRegression

    # tol 1e-3 (liblinear's default is 1e-4): on 512-unit features it cut a fit at C = 4 from 122 s to
    # 15 s with the same validation accuracy (measured for the transfer suite). Seeded: reproducible.
    if classes == 2:
        return LogisticRegression(penalty="l1", C=c, solver="liblinear", max_iter=1000, tol=1e-3, random_state=0)
    return LogisticRegression(penalty="l1", C=c, solver="saga", max_iter=500, tol=1e-3, random_state=0)  # multinomial


def fit(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], classes: list[str]):
    """L1 logistic regression with C chosen on val: (results, fitted pipeline).

    Two classes add the top unit (largest |weight|) and its test accuracy alone, or top_unit
    None when L1 kept no unit at all.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    start = time.time()
    best, unconverged = None, []
    for c in C_GRID:
        # Standardised units: the solvers converge ~10x faster, and weights compare across units.
        clf = make_pipeline(StandardScaler(), _logistic_regression(c, len(classes)))
        with warnings.catch_warnings():  # one line below instead of a warning per C
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(features["train"], labels["train"])
        if np.max(clf[-1].n_iter_) >= clf[-1].max_iter:
            unconverged.append(c)
        val = clf.score(features["val"], labels["val"])
        if best is None or val > best[0]:
            best = (val, c, clf)
    val_acc, c, clf = best
    if unconverged:
        logging.warning("the solver stopped at its iteration limit for C in %s (C=%g chosen)", unconverged, c)
    coef = clf[-1].coef_
    used = np.any(coef != 0, axis=0)
    predicted = {s: clf.predict(features[s]) for s in ("val", "test")}
    results = {
        "labels": classes,
        "C": c,
        "train_accuracy": clf.score(features["train"], labels["train"]),
        "val_accuracy": val_acc,
        "test_accuracy": clf.score(features["test"], labels["test"]),
        "val_macro_f1": f1_score(labels["val"], predicted["val"], average="macro", labels=range(len(classes))),
        "test_macro_f1": f1_score(labels["test"], predicted["test"], average="macro", labels=range(len(classes))),
        "test_confusion_matrix": confusion_matrix(labels["test"], predicted["test"],
                                                  labels=range(len(classes))).tolist(),
        "units_used": int(np.count_nonzero(used)),
        "units_total": int(coef.shape[1]),
        "unconverged_C": unconverged,
    }
    if len(classes) == 2:
        top = int(np.argmax(np.abs(coef[0]))) if used.any() else None
        single = (LogisticRegression(C=1e6, max_iter=1000).fit(features["train"][:, [top]], labels["train"])
                  .score(features["test"][:, [top]], labels["test"]) if top is not None else None)
        results.update(top_unit=top, top_unit_weight=float(coef[0, top]) if top is not None else None,
                       top_unit_test_accuracy=single)
    results["fit_seconds"] = time.time() - start
    return results, clf


def fit_readouts(features: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray], classes: list[str]):
    """`fit` on each readout FEATURES holds ({split: {readout: array}}): ({readout: (results, pipeline)}, the
    readout with the best validation accuracy). Test accuracy never takes part in the choice; on a tie
    the first readout in READOUTS order wins."""
    readouts = [r for r in READOUTS if r in features["train"]]
    fits = {r: fit({s: by_readout[r] for s, by_readout in features.items()}, labels, classes) for r in readouts}
    return fits, max(readouts, key=lambda r: fits[r][0]["val_accuracy"])  # max keeps the first of equals


def tfidf_baseline(texts: dict, labels: dict[str, np.ndarray], text_prep: str) -> dict:
    """A word uni+bigram TF-IDF logistic regression (L2, C chosen on val) on the same splits and text prep:
    {C, features (n-grams), <split>_accuracy for every split in TEXTS, fit_seconds}."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    start = time.time()
    prep = TEXT_PREPS[text_prep][0]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True,
                                 preprocessor=lambda text: prep(text).lower())
    x = {"train": vectorizer.fit_transform(texts["train"])}
    x.update({s: vectorizer.transform(t) for s, t in texts.items() if s != "train"})
    fits = [(c, LogisticRegression(C=c, solver="liblinear", max_iter=1000).fit(x["train"], labels["train"]))
            for c in TFIDF_C_GRID]
    c, best = max(fits, key=lambda f: f[1].score(x["val"], labels["val"]))
    return {"C": c, "features": len(vectorizer.vocabulary_),
            **{f"{s}_accuracy": best.score(x[s], labels[s]) for s in x}, "fit_seconds": time.time() - start}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    with files.replace_whole(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def plot_top_unit(values: np.ndarray, labels: np.ndarray, classes: list[str], unit: int, readout: str,
                  path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(values.min(), values.max(), 40)
    for index, color in ((0, "tab:red"), (1, "tab:blue")):
        ax.hist(values[labels == index], bins=bins, alpha=0.6, color=color, label=f"label {classes[index]}")
    ax.set_xlabel(f"unit {unit} ({readout})")
    ax.set_ylabel("texts")
    ax.set_title("Top unit by L1 weight, test set")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], classes: list[str], path: str) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(classes), 1.0 + 0.6 * len(classes)))
    ConfusionMatrixDisplay(np.array(matrix), display_labels=classes).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title("Test set")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def stored_readouts(readouts: list[str]) -> list[str]:
    """The readouts featurised (and cached) for READOUTS: concat_hidden's parts instead of it, so that a
    --features file of the four plain readouts serves --readout auto as before, and holds no copy."""
    wanted = {part for r in readouts for part in (CONCAT_PARTS if r == CONCAT else (r,))}
    return [r for r in READOUTS if r in wanted]


def with_readouts(features: dict[str, np.ndarray], readouts: list[str]) -> dict[str, np.ndarray]:
    """{readout: features} of READOUTS from those of stored_readouts(READOUTS), concat_hidden joined (in
    inference.CONCAT_PARTS order, as Featurizer joins it)."""
    return {r: np.concatenate([features[p] for p in CONCAT_PARTS], axis=1) if r == CONCAT else features[r]
            for r in readouts}


def featurise(task: Task, featurizer: Featurizer, readouts: list[str], cache: str):
    """{split: {readout: features}} of the task's splits, from CACHE when it holds exactly their stored
    readouts (else computed, and saved there if CACHE is given), and texts/s (None when cached)."""
    from tqdm import tqdm

    total, stored = sum(len(split.texts) for split in task.splits.values()), stored_readouts(readouts)

    def compute():
        with tqdm(total=total, unit="text", desc="featurising", file=sys.stderr) as bar:
            return {s: featurizer.transform_all(split.texts, bar.update, stored) for s, split in task.splits.items()}

    start = time.time()
    if not cache:
        features, from_cache = compute(), False
    else:
        key = feature_cache.key(featurizer.identity(), featurizer.text_prep, stored,
                                {s: split.source for s, split in task.splits.items()})
        features, from_cache = feature_cache.cached(cache, key, compute)
    features = {s: with_readouts(by_readout, readouts) for s, by_readout in features.items()}
    return features, None if from_cache else total / max(time.time() - start, 1e-9)


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    try:
        config = CommonConfig.from_flags()
    except ValueError as e:
        sys.exit(f"error: {e}")
    dist.init(config.intra_op_threads, config.inter_op_threads)
    out = FLAGS.output_dir or os.path.join(config.model_dir, "transfer")
    readouts = list(READOUTS) if FLAGS.readout == AUTO else [FLAGS.readout]
    try:
        os.makedirs(out, exist_ok=True)
        files.check_writable(os.path.join(out, "results.json"))
        if FLAGS.features:
            files.check_writable(FLAGS.features, "--features")
        task = csv_task("transfer", {s: getattr(FLAGS, s) for s in SPLITS}, FLAGS.text_column, FLAGS.label_column,
                        FLAGS.encoding)
        for line in overlap_warnings(task):
            print(f"[transfer] {line}", file=sys.stderr, flush=True)
        featurizer = Featurizer(config.model_dir, FLAGS.text_prep, readouts[0], config.batch_size_per_worker,
                                config.seq_length)
        features, texts_per_s = featurise(task, featurizer, readouts, FLAGS.features)
        empty = {s: sum(is_empty(t, FLAGS.text_prep) for t in split.texts) for s, split in task.splits.items()}
    except (CheckpointError, OSError, ValueError) as e:  # InputError and NotWritable are ValueErrors
        sys.exit(f"error: {e}")
    labels = {s: split.labels for s, split in task.splits.items()}
    fits, readout = fit_readouts(features, labels, task.classes)
    results, (scaler, model) = fits[readout]
    featurization = {"text_prep": FLAGS.text_prep, "readout": readout}
    identity = featurizer.identity()
    results.update(model_dir=config.model_dir, checkpoint=identity["checkpoint"], featurization=featurization,
                   readout_asked=FLAGS.readout,
                   readouts={r: {k: fits[r][0][k] for k in ("C", "val_accuracy", "test_accuracy", "units_used")}
                             for r in fits},
                   texts_per_second=texts_per_s, sizes={s: int(y.size) for s, y in labels.items()}, empty_texts=empty)
    info = {k: results[k] for k in ("C", "units_used", "units_total", "top_unit", "top_unit_weight") if k in results}
    Classifier(task.classes, model.coef_, model.intercept_, scaler.mean_, scaler.scale_,
               {**info, "featurization": featurization, "readout_asked": FLAGS.readout,
                "readouts_val_accuracy": {r: fits[r][0]["val_accuracy"] for r in fits},
                "model_dir": identity["model_dir"],
                "checkpoint": {k: identity[k] for k in IDENTITY_KEYS}}).save(out)
    files.write_json(os.path.join(out, "results.json"), results)
    for stale in ("top_unit_histogram.png", "confusion_matrix.png"):  # no earlier run's plot passes for this one
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    if FLAGS.readout == AUTO:
        print("[transfer] readout " + readout + ", the best validation accuracy of "
              + ", ".join(f"{r} {fits[r][0]['val_accuracy']:.4f}" for r in fits), flush=True)
    summary = f"[transfer] test accuracy {results['test_accuracy']:.4f}, macro-F1 {results['test_macro_f1']:.4f}, " \
              f"{len(task.classes)} classes, {results['units_used']} of {results['units_total']} units " \
              f"(C={results['C']:g}, {readout})"
    if len(task.classes) > 2:
        plot_confusion(results["test_confusion_matrix"], task.classes, os.path.join(out, "confusion_matrix.png"))
    elif results["top_unit"] is None:
        summary += "; L1 selected no unit (every weight is zero), so there is no top unit"
    else:
        plot_top_unit(features["test"][readout][:, results["top_unit"]], labels["test"], task.classes,
                      results["top_unit"], readout, os.path.join(out, "top_unit_histogram.png"))
        summary += f"; top unit {results['top_unit']} alone {results['top_unit_test_accuracy']:.4f}"
    print(summary + f"; {sum(empty.values())} empty texts"
          + (f"; featurised {texts_per_s:,.0f} texts/s" if texts_per_s else "; features from " + FLAGS.features)
          + f". Results and classifier in {out}", flush=True)


if __name__ == "__main__":
    define_common()
    define_featurizer_flags(fitting=True)
    flags.DEFINE_string("train", None, "CSV of training texts and labels.")
    flags.DEFINE_string("val", None, "CSV of validation texts (chooses the regularisation strength and, with "
                        "--readout auto, the readout).")
    flags.DEFINE_string("test", None, "CSV of test texts.")
    flags.DEFINE_string("text_column", "sentence", "CSV column holding the text.")
    flags.DEFINE_string("label_column", "label", "CSV column holding the label (two or more classes).")
    flags.DEFINE_string("encoding", "utf-8-sig", "CSV encoding (utf-8-sig reads UTF-8 with or without a BOM), "
                        "for example latin-1.")
    flags.DEFINE_string("output_dir", "", "Where results, classifier and plots go; default MODEL_DIR/transfer.")
    flags.DEFINE_string("features", "", ".npz to save features to, reused only when made from the same checkpoint, "
                        "input files, columns, encoding, text prep and readouts (horovod_mlstm.features).")
    flags.mark_flags_as_required(["train", "val", "test"])
    app.run(main)
