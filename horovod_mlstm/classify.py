"""Label new texts with a classifier that transfer saved.

    python -m horovod_mlstm.classify --model_dir M --classifier M/transfer --input reviews.csv \
        --text_column text --output labels.csv

Input: a CSV with a header (--text_column), JSON lines (--text_field), or plain text with one
text per line; any of them may be gzipped. Output: a CSV with one row per input text, in input
order: its index, the predicted label, and the probability of each class. A text that is empty
after the text prep gets an empty label and empty probabilities (there is nothing to classify),
and is counted in the final line. The same from Python: horovod_mlstm.classifier, which this
CLI wraps with reading, batching and writing.
"""

from __future__ import annotations

import csv
import os
import sys
import time

import numpy as np
from absl import app, flags

from horovod_mlstm.classifier import Classifier
from horovod_mlstm.textfiles import InputError, check_writable, read_texts


def settings_from(classifier: Classifier, FLAGS) -> dict:
    """The classifier's featurisation; an explicit flag that contradicts it is an error."""
    settings = dict(classifier.featurization)
    for name, fitted in settings.items():
        given = FLAGS[name].value
        if given is not None and given != fitted:
            raise InputError(f"--{name}={given} conflicts with the classifier, which was fitted with "
                             f"{name}={fitted} (leave --{name} out to use it)")
    return settings


def write_predictions(path: str, labels: list[str], probabilities: list) -> None:
    """index, label, p_<label>...: one row per input; None (an empty text) leaves the row's values empty."""
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label", *(f"p_{label}" for label in labels)])
        for index, p in enumerate(probabilities):
            if p is None:
                writer.writerow([index, "", *[""] * len(labels)])
            else:
                writer.writerow([index, labels[int(np.argmax(p))], *(f"{v:.6f}" for v in p)])
    os.replace(path + ".tmp", path)


def main(argv):
    from tqdm import tqdm

    from horovod_mlstm import distributed as dist
    from horovod_mlstm.checkpoint import CheckpointError
    from horovod_mlstm.inference import Featurizer, is_empty

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    dist.init(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    try:
        check_writable(FLAGS.output)
        classifier = Classifier.load(FLAGS.classifier)
        settings = settings_from(classifier, FLAGS)
        texts = read_texts(FLAGS.input, FLAGS.text_column, FLAGS.text_field, FLAGS.encoding)
        featurizer = Featurizer(FLAGS.model_dir, **settings, batch_size=FLAGS.batch_size_per_worker,
                                chunk=FLAGS.seq_length)
        classifier.check(featurizer)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    keep = [i for i, t in enumerate(texts) if not is_empty(t, settings["text_prep"])]
    start = time.time()
    with tqdm(total=len(keep), unit="text", desc="classifying", file=sys.stderr) as bar:
        features = featurizer.transform([texts[i] for i in keep], progress=bar.update)
    probabilities = [None] * len(texts)
    for i, p in zip(keep, classifier.predict_proba(features)):
        probabilities[i] = p
    write_predictions(FLAGS.output, classifier.labels, probabilities)
    seconds = time.time() - start
    print(f"[classify] {len(texts)} texts ({len(texts) - len(keep)} empty, left unlabelled) in {seconds:.1f} s, "
          f"{len(keep) / max(seconds, 1e-9):,.0f} texts/s; labels in {FLAGS.output}", flush=True)


if __name__ == "__main__":
    from horovod_mlstm.flags import define_common
    from horovod_mlstm.inference import define_featurizer_flags

    define_common()
    define_featurizer_flags(defaults=False)
    flags.DEFINE_string("classifier", None, "classifier.json written by transfer, or the directory holding it.")
    flags.DEFINE_string("input", None, "Texts: CSV (--text_column), JSON lines (--text_field) or one per line; "
                        "plain or .gz.")
    flags.DEFINE_string("output", None, "CSV to write: index, label, p_<label> per class.")
    flags.DEFINE_string("text_column", "", "CSV column holding the text.")
    flags.DEFINE_string("text_field", "", "JSON-lines field holding the text.")
    flags.DEFINE_string("encoding", "utf-8-sig", "Input encoding (utf-8-sig also reads UTF-8 with or without a "
                        "BOM), for example latin-1.")
    flags.mark_flags_as_required(["classifier", "input", "output"])
    app.run(main)
