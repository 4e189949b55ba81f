"""Label new texts with a classifier that transfer saved.

    python -m horovod_mlstm.classify --model_dir M --classifier M/transfer --input reviews.csv \
        --text_column text --output labels.csv

Input: a CSV with a header (--text_column), JSON lines (--text_field), or plain text with one
text per line; any of them may be gzipped. Output: a CSV with one row per input text, in input
order: its index, the predicted label, and the probability of each class. A text that is empty
after the text prep gets an empty label and empty probabilities (there is nothing to classify),
and is counted in the final line. The same from Python: horovod_mlstm.classifier, which this
CLI wraps with reading, batching and writing.

The input is read twice, a block at a time: once to check every row (so a bad one stops the run
before any work) and count the texts, then window by window into the featuriser, each window's
rows written as they are labelled. Memory is bounded by the window, whatever the file's size; the
output replaces --output whole at the end (files.replace_whole), so a failed run leaves none.
"""

from __future__ import annotations

import csv
import sys
import time

from absl import app, flags

from horovod_mlstm import files
from horovod_mlstm.classifier import Classifier
from horovod_mlstm.textfiles import InputError, texts


def settings_from(classifier: Classifier, FLAGS) -> dict:
    """The classifier's featurisation; an explicit flag that contradicts it is an error."""
    settings = dict(classifier.featurization)
    for name, fitted in settings.items():
        given = FLAGS[name].value
        if given is not None and given != fitted:
            raise InputError(f"--{name}={given} conflicts with the classifier, which was fitted with "
                             f"{name}={fitted} (leave --{name} out to use it)")
    return settings


def label_all(featurizer, classifier: Classifier, inputs, output, progress=None) -> tuple[int, int]:
    """Writes a row per text of INPUTS to the open file OUTPUT, window by window, in input order:
    index, label, p_<label>...; an empty text's values are left empty. `progress(n)` is called as n
    more texts are done. Returns (texts, empty texts)."""
    from horovod_mlstm.inference import is_empty, windows

    writer = csv.writer(output)
    writer.writerow(["index", "label", *(f"p_{label}" for label in classifier.labels)])
    index = empty = 0
    for window in windows(inputs, featurizer.window):
        kept = [not is_empty(t, featurizer.text_prep) for t in window]
        features = featurizer.transform([t for t, keep in zip(window, kept) if keep], progress)
        if progress:
            progress(kept.count(False))
        probabilities = iter(classifier.predict_proba(features))
        for keep in kept:
            if keep:
                p = next(probabilities)
                writer.writerow([index, classifier.labels[int(p.argmax())], *(f"{v:.6f}" for v in p)])
            else:
                writer.writerow([index, "", *[""] * len(classifier.labels)])
                empty += 1
            index += 1
    return index, empty


def main(argv):
    from tqdm import tqdm

    from horovod_mlstm import distributed as dist
    from horovod_mlstm.checkpoint import CheckpointError
    from horovod_mlstm.flags import CommonConfig
    from horovod_mlstm.inference import Featurizer

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    try:
        config = CommonConfig.from_flags()
    except ValueError as e:
        sys.exit(f"error: {e}")
    dist.init(config.intra_op_threads, config.inter_op_threads)

    def read():
        return texts(FLAGS.input, FLAGS.text_column, FLAGS.text_field, FLAGS.encoding)

    try:
        files.check_writable(FLAGS.output, "--output")
        classifier = Classifier.load(FLAGS.classifier)
        settings = settings_from(classifier, FLAGS)
        total = sum(1 for _ in read())  # every row checked before any work
        featurizer = Featurizer(config.model_dir, **settings, batch_size=config.batch_size_per_worker,
                                chunk=config.seq_length)
        classifier.check(featurizer)
        start = time.time()
        with tqdm(total=total, unit="text", desc="classifying", file=sys.stderr) as bar, \
                files.replace_whole(FLAGS.output, "w", newline="", encoding="utf-8") as output:
            total, empty = label_all(featurizer, classifier, read(), output, bar.update)
    except (CheckpointError, FileNotFoundError, ValueError) as e:  # InputError, NotWritable: ValueErrors
        sys.exit(f"error: {e}")
    seconds = time.time() - start
    print(f"[classify] {total} texts ({empty} empty, left unlabelled) in {seconds:.1f} s, "
          f"{(total - empty) / max(seconds, 1e-9):,.0f} texts/s; labels in {FLAGS.output}", flush=True)


if __name__ == "__main__":
    from horovod_mlstm.flags import define_common
    from horovod_mlstm.inference import define_featurizer_flags

    define_common()
    define_featurizer_flags(fitting=False)
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
