"""Sentiment transfer (Radford et al. 2017): mLSTM cell state -> L1 logistic regression.

    python -m horovod_mlstm.transfer --model_dir M --train train.csv --val dev.csv --test test.csv \
        [--text_column sentence --label_column label] [--output_dir O] [--features F.npz]

Each text is featurised as the final cell state after reading it (inference.final_states).
An L1-regularised logistic regression is fit on the standardised training features for each
strength C on a grid; the C with the best validation accuracy is kept and scored on the test set. With L1
most weights go to zero; the unit with the largest |weight| is the candidate "sentiment
neuron", and a one-feature logistic regression on that unit alone shows how much it carries.
Writes O/results.json and O/top_unit_histogram.png (the top unit's value on test, by class).
"""

from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
from absl import app, flags, logging

from horovod_mlstm import distributed as dist
from horovod_mlstm.checkpoint import CheckpointError
from horovod_mlstm.flags import define_common

SPLITS = ("train", "val", "test")
C_GRID = tuple(2.0 ** k for k in range(-6, 4))


class TransferError(Exception):
    """Bad transfer input, explained in one line."""


def read_labelled_csv(path: str, text_column: str, label_column: str,
                      classes: list[str] | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """Texts, 0/1 labels and the two label values, from a CSV with a header.

    Without `classes` (the training file) the file must hold exactly two label values, mapped
    in sorted order. With the training file's `classes` (validation and test) every label must
    be one of them, so 0 and 1 mean the same in every split, and one class alone is allowed.
    """
    if not os.path.isfile(path):
        raise TransferError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise TransferError(f"{path}: no column {', '.join(map(repr, missing))} "
                                f"(columns: {', '.join(reader.fieldnames or []) or 'none'})")
        rows = [(r[text_column], r[label_column].strip()) for r in reader]
    if not rows:
        raise TransferError(f"{path}: no rows")
    found = sorted({label for _, label in rows})
    if classes is None:
        if len(found) != 2:
            raise TransferError(f"{path}: labels must be two classes, found {len(found)}: {found[:5]}")
        classes = found
    unknown = [label for label in found if label not in classes]
    if unknown:
        raise TransferError(f"{path}: label {unknown[0]!r} is not one of the training file's classes {classes}")
    return [t for t, _ in rows], np.array([classes.index(label) for _, label in rows], np.int64), classes


def fit(features: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict:
    """L1 logistic regression with C chosen on val; the top unit and its accuracy alone."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for c in C_GRID:
        # Standardised units: liblinear converges ~10x faster, and weights compare across units.
        clf = make_pipeline(StandardScaler(), LogisticRegression(penalty="l1", C=c, solver="liblinear",
                                                                 max_iter=1000))
        clf.fit(features["train"], labels["train"])
        val = clf.score(features["val"], labels["val"])
        if best is None or val > best[0]:
            best = (val, c, clf)
    val_acc, c, clf = best
    weights = clf[-1].coef_[0]
    top = int(np.argmax(np.abs(weights)))
    single = LogisticRegression(C=1e6, max_iter=1000).fit(features["train"][:, [top]], labels["train"])
    return {
        "C": c,
        "train_accuracy": clf.score(features["train"], labels["train"]),
        "val_accuracy": val_acc,
        "test_accuracy": clf.score(features["test"], labels["test"]),
        "units_used": int(np.count_nonzero(weights)),
        "units_total": int(weights.size),
        "top_unit": top,
        "top_unit_weight": float(weights[top]),
        "top_unit_test_accuracy": single.score(features["test"][:, [top]], labels["test"]),
    }


def plot_top_unit(values: np.ndarray, labels: np.ndarray, unit: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(values.min(), values.max(), 40)
    for label, color in ((0, "tab:red"), (1, "tab:blue")):
        ax.hist(values[labels == label], bins=bins, alpha=0.6, color=color, label=f"class {label}")
    ax.set_xlabel(f"cell state of unit {unit} after the text")
    ax.set_ylabel("texts")
    ax.set_title("Top unit by L1 weight, test set")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def featurise_splits(FLAGS) -> tuple[dict, dict, float | None]:
    """Features and labels of the three splits, from --features if it exists, else from the model."""
    from tqdm import tqdm

    from horovod_mlstm.inference import final_states, load_trained_model

    if FLAGS.features and os.path.exists(FLAGS.features):
        saved = np.load(FLAGS.features)
        missing = [k for s in SPLITS for k in (f"{s}_features", f"{s}_labels") if k not in saved]
        if missing:
            raise TransferError(f"{FLAGS.features}: not a features file of this tool (missing {missing[0]})")
        logging.info("features from %s", FLAGS.features)
        return ({s: saved[f"{s}_features"] for s in SPLITS}, {s: saved[f"{s}_labels"] for s in SPLITS}, None)
    data, classes = {}, None
    for split in SPLITS:  # train first: its two label values define 0 and 1 for every split
        texts, labels, classes = read_labelled_csv(getattr(FLAGS, split), FLAGS.text_column, FLAGS.label_column,
                                                   classes)
        data[split] = (texts, labels)
    model = load_trained_model(FLAGS.model_dir)
    features, rates = {}, []
    total = sum(len(texts) for texts, _ in data.values())
    with tqdm(total=total, unit="text", desc="featurising", file=sys.stderr) as bar:
        for split, (texts, _) in data.items():
            features[split], rate = final_states(model, texts, FLAGS.batch_size_per_worker, FLAGS.seq_length,
                                                 progress=bar.update)
            rates.append(rate)
    labels = {s: y for s, (_, y) in data.items()}
    if FLAGS.features:
        np.savez_compressed(FLAGS.features, **{f"{s}_features": features[s] for s in SPLITS},
                            **{f"{s}_labels": labels[s] for s in SPLITS})
    return features, labels, total / sum(len(data[s][0]) / r for s, r in zip(SPLITS, rates))


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    dist.init(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    try:
        features, labels, texts_per_s = featurise_splits(FLAGS)
    except (TransferError, CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    results = fit(features, labels)
    results.update(model_dir=FLAGS.model_dir, texts_per_second=texts_per_s,
                   sizes={s: int(len(labels[s])) for s in SPLITS})
    out = FLAGS.output_dir or os.path.join(FLAGS.model_dir, "transfer")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_top_unit(features["test"][:, results["top_unit"]], labels["test"], results["top_unit"],
                  os.path.join(out, "top_unit_histogram.png"))
    print(f"[transfer] test accuracy {results['test_accuracy']:.4f} with {results['units_used']} of "
          f"{results['units_total']} units (C={results['C']:g}); top unit {results['top_unit']} alone "
          f"{results['top_unit_test_accuracy']:.4f}"
          + (f"; featurised {texts_per_s:,.0f} texts/s" if texts_per_s else "") + f". Results in {out}",
          flush=True)


if __name__ == "__main__":
    define_common()
    flags.DEFINE_string("train", None, "CSV of training texts and labels.")
    flags.DEFINE_string("val", None, "CSV of validation texts (chooses the regularisation strength).")
    flags.DEFINE_string("test", None, "CSV of test texts.")
    flags.DEFINE_string("text_column", "sentence", "CSV column holding the text.")
    flags.DEFINE_string("label_column", "label", "CSV column holding the label (two classes).")
    flags.DEFINE_string("output_dir", "", "Where results.json and the histogram go; default MODEL_DIR/transfer.")
    flags.DEFINE_string("features", "", ".npz to save features to, or to reuse when it exists.")
    flags.mark_flags_as_required(["train", "val", "test"])
    app.run(main)
