"""Transfer (Radford et al. 2017): features of a trained model -> L1 logistic regression, saved for classify.

    python -m horovod_mlstm.transfer --model_dir M --train train.csv --val dev.csv --test test.csv \
        [--text_column sentence --label_column label] [--text_prep project|radford] \
        [--readout final_cell|final_hidden|mean_hidden|max_hidden] [--output_dir O] [--features F.npz]

Each text is featurised by inference.Featurizer (by default the final cell state after reading
it). An L1-regularised logistic regression is fit on the standardised training features for each
strength C on a grid; the C with the best validation accuracy is kept and scored on the test set.
Two classes: liblinear, and the unit with the largest |weight| is the candidate "sentiment
neuron" (a one-feature logistic regression on it alone shows how much it carries). More classes:
multinomial L1 (saga). Writes O/results.json, O/classifier.{json,npz} (read by classify), and
O/top_unit_histogram.png (two classes) or O/confusion_matrix.png (more).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import numpy as np
from absl import app, flags, logging

from horovod_mlstm import distributed as dist
from horovod_mlstm.checkpoint import CheckpointError
from horovod_mlstm.classifier import Classifier, write_json
from horovod_mlstm.flags import define_common
from horovod_mlstm.inference import CHECKPOINT_KEYS, Featurizer, define_featurizer_flags, file_sha256, is_empty
from horovod_mlstm.textfiles import InputError, check_writable, read_csv_columns

SPLITS = ("train", "val", "test")
# Tops out at 2^0 like Radford et al.'s train_with_reg_cv (2^-8..2^0). Larger C picked only weak
# features (untrained, the first milestones) and cost 50-200 s per liblinear fit on SST at 512 units
# (C=2: 53 s, C=4: 205 s, measured for the transfer suite), against seconds for C <= 1.
C_GRID = tuple(2.0 ** k for k in range(-6, 1))
FEATURES_FORMAT = 2  # version of the --features cache's key


class TransferError(InputError):
    """Bad transfer input, explained in one line."""


def label_order(found: set[str]) -> list[str]:
    """Label values in order: numerically when they are all numbers (so "10" comes after "9")."""
    try:
        return sorted(found, key=float)
    except ValueError:
        return sorted(found)


def read_labelled_csv(path: str, text_column: str, label_column: str, classes: list[str] | None = None,
                      encoding: str = "utf-8-sig") -> tuple[list[str], np.ndarray, list[str]]:
    """Texts, label indices and the label values, from a CSV with a header.

    Without `classes` (the training file) the file must hold at least two label values, which
    define the classes in order. With the training file's `classes` (validation and test) every
    label must be one of them, so an index means the same in every split; fewer are allowed.
    """
    rows = [(line, text, label.strip()) for line, (text, label) in
            read_csv_columns(path, [text_column, label_column], encoding)]
    if not rows:
        raise TransferError(f"{path}: no rows")
    if classes is None:
        classes = label_order({label for _, _, label in rows})
        if len(classes) < 2:
            raise TransferError(f"{path}: labels must be at least two classes, found {len(classes)}: {classes}")
    for line, _, label in rows:
        if label not in classes:
            raise TransferError(f"{path}:{line}: label {label!r} is not one of the training file's classes {classes}")
    return [t for _, t, _ in rows], np.array([classes.index(label) for _, _, label in rows], np.int64), classes


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
    return results, clf


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_top_unit(values: np.ndarray, labels: np.ndarray, classes: list[str], unit: int, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(values.min(), values.max(), 40)
    for index, color in ((0, "tab:red"), (1, "tab:blue")):
        ax.hist(values[labels == index], bins=bins, alpha=0.6, color=color, label=f"label {classes[index]}")
    ax.set_xlabel(f"unit {unit} after the text")
    ax.set_ylabel("texts")
    ax.set_title("Top unit by L1 weight, test set")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], classes: list[str], path: str) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(classes), 1.0 + 0.6 * len(classes)))
    ConfusionMatrixDisplay(np.array(matrix), display_labels=classes).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title("Test set")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def file_identity(path: str) -> dict:
    return {"path": os.path.abspath(path), "size": os.path.getsize(path), "sha256": file_sha256(path)}


def features_key(FLAGS, featurizer) -> dict:
    """Everything the cached features depend on: checkpoint, input files, columns, featurisation."""
    identity = featurizer.identity()
    return {"format": FEATURES_FORMAT,
            "checkpoint": {k: identity[k] for k in CHECKPOINT_KEYS},
            "files": {s: file_identity(getattr(FLAGS, s)) for s in SPLITS},
            "columns": [FLAGS.text_column, FLAGS.label_column], "encoding": FLAGS.encoding,
            **featurizer.settings}


def cached_features(path: str, key: dict) -> dict | None:
    """The features saved in PATH if they were made from exactly KEY, else None (saying why on stderr)."""
    if not path or not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            stored = json.loads(str(saved["key"])) if "key" in saved else {}
            features = {s: saved[f"{s}_features"] for s in SPLITS if f"{s}_features" in saved}
    except (OSError, ValueError) as e:
        raise TransferError(f"{path}: not a features file of this tool ({e}); move it or pass another --features")
    differs = [k for k in key if stored.get(k) != key[k]]
    if differs or len(features) != len(SPLITS):
        print(f"[transfer] {path} holds features of other inputs ({', '.join(differs) or 'splits'} differ); "
              "recomputing", file=sys.stderr, flush=True)
        return None
    logging.info("features from %s", path)
    return features


def featurise_splits(FLAGS):
    """Texts' labels and features of the three splits, the classes, the featurizer and texts/s (None if cached)."""
    from tqdm import tqdm

    data, classes = {}, None
    for split in SPLITS:  # train first: its label values define the classes for every split
        texts, labels, classes = read_labelled_csv(getattr(FLAGS, split), FLAGS.text_column, FLAGS.label_column,
                                                   classes, FLAGS.encoding)
        data[split] = (texts, labels)
    featurizer = Featurizer(FLAGS.model_dir, FLAGS.text_prep, FLAGS.readout, FLAGS.batch_size_per_worker,
                            FLAGS.seq_length)
    key = features_key(FLAGS, featurizer) if FLAGS.features else None
    features, rate = cached_features(FLAGS.features, key) if key else None, None
    if features is None:
        total = sum(len(texts) for texts, _ in data.values())
        start = time.time()
        with tqdm(total=total, unit="text", desc="featurising", file=sys.stderr) as bar:
            features = {s: featurizer.transform(texts, progress=bar.update) for s, (texts, _) in data.items()}
        rate = total / max(time.time() - start, 1e-9)
        if FLAGS.features:
            with open(FLAGS.features + ".tmp", "wb") as f:
                np.savez_compressed(f, key=json.dumps(key, sort_keys=True),
                                    **{f"{s}_features": features[s] for s in SPLITS})
            os.replace(FLAGS.features + ".tmp", FLAGS.features)
    return data, features, classes, featurizer, rate


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    dist.init(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    out = FLAGS.output_dir or os.path.join(FLAGS.model_dir, "transfer")
    try:
        os.makedirs(out, exist_ok=True)
        check_writable(os.path.join(out, "results.json"))
        data, features, classes, featurizer, texts_per_s = featurise_splits(FLAGS)
    except (CheckpointError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    labels = {s: y for s, (_, y) in data.items()}
    results, pipeline = fit(features, labels, classes)
    empty = {s: sum(is_empty(t, FLAGS.text_prep) for t in texts) for s, (texts, _) in data.items()}
    identity = featurizer.identity()
    results.update(model_dir=FLAGS.model_dir, checkpoint=identity["checkpoint"], featurization=featurizer.settings,
                   texts_per_second=texts_per_s, sizes={s: int(len(labels[s])) for s in SPLITS}, empty_texts=empty)
    info = {k: results[k] for k in ("C", "units_used", "units_total", "top_unit", "top_unit_weight") if k in results}
    scaler, model = pipeline
    Classifier(classes, model.coef_, model.intercept_, scaler.mean_, scaler.scale_,
               {**info, "featurization": featurizer.settings, "model_dir": identity["model_dir"],
                "checkpoint": {k: identity[k] for k in CHECKPOINT_KEYS}}).save(out)
    write_json(os.path.join(out, "results.json"), results)
    for stale in ("top_unit_histogram.png", "confusion_matrix.png"):  # no earlier run's plot passes for this one
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    summary = f"[transfer] test accuracy {results['test_accuracy']:.4f}, macro-F1 {results['test_macro_f1']:.4f}, " \
              f"{len(classes)} classes, {results['units_used']} of {results['units_total']} units (C={results['C']:g})"
    if len(classes) > 2:
        plot_confusion(results["test_confusion_matrix"], classes, os.path.join(out, "confusion_matrix.png"))
    elif results["top_unit"] is None:
        summary += "; L1 selected no unit (every weight is zero), so there is no top unit"
    else:
        plot_top_unit(features["test"][:, results["top_unit"]], labels["test"], classes, results["top_unit"],
                      os.path.join(out, "top_unit_histogram.png"))
        summary += f"; top unit {results['top_unit']} alone {results['top_unit_test_accuracy']:.4f}"
    print(summary + f"; {sum(empty.values())} empty texts"
          + (f"; featurised {texts_per_s:,.0f} texts/s" if texts_per_s else "; features from " + FLAGS.features)
          + f". Results and classifier in {out}", flush=True)


if __name__ == "__main__":
    define_common()
    define_featurizer_flags(defaults=True)
    flags.DEFINE_string("train", None, "CSV of training texts and labels.")
    flags.DEFINE_string("val", None, "CSV of validation texts (chooses the regularisation strength).")
    flags.DEFINE_string("test", None, "CSV of test texts.")
    flags.DEFINE_string("text_column", "sentence", "CSV column holding the text.")
    flags.DEFINE_string("label_column", "label", "CSV column holding the label (two or more classes).")
    flags.DEFINE_string("encoding", "utf-8-sig", "CSV encoding (utf-8-sig reads UTF-8 with or without a BOM), "
                        "for example latin-1.")
    flags.DEFINE_string("output_dir", "", "Where results, classifier and plots go; default MODEL_DIR/transfer.")
    flags.DEFINE_string("features", "", ".npz to save features to, reused only when made from the same checkpoint, "
                        "files, columns and featurisation.")
    flags.mark_flags_as_required(["train", "val", "test"])
    app.run(main)
