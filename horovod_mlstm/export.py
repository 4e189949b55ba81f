"""Export a classifier that transfer fitted as a TensorFlow SavedModel: raw texts in, class probabilities out.

    python -m horovod_mlstm.export --classifier M/transfer --output exported/ [--model_dir M] [--overwrite]

The SavedModel holds the whole of classify in graph ops (serving.py): the text prep, the model's read
of the bytes, the readout and the linear classifier. Loading it needs TensorFlow alone, not this
package nor its fused CPU kernels:

    model = tf.saved_model.load("exported")
    out = model.signatures["serving_default"](texts=tf.constant(["Great sound.", "Broke in a week."]))
    out["probabilities"]   # float32 [N, classes], columns in the order of model.labels
    out["label"]           # string [N], the most probable class

A text that is empty after its prep gets NaN probabilities and the label "" (classify leaves it
unlabelled). The model dir defaults to the one the classifier names; a model dir holding other weights
than the classifier was fitted on is refused. DIR/assets.extra/classifier.json is a copy of the
classifier's JSON (labels, featurisation, the weights it was fitted on). The SavedModel is built beside
DIR and renamed into place; an existing DIR that is not empty is replaced only with --overwrite.
--batch_size_per_worker and --seq_length set how many texts the SavedModel reads at once and in pieces
of how many bytes (memory, not results).
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid

from absl import app, flags

from horovod_mlstm.classifier import JSON_NAME, Classifier
from horovod_mlstm.files import NotWritable

EXTRA = "assets.extra"  # the SavedModel's place for files TensorFlow does not load


def check_output(path: str, overwrite: bool) -> None:
    """Before any work: PATH can become the SavedModel's directory."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotWritable(f"--output {path}: is a file, not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise NotWritable(f"--output {path}: is not empty (pass --overwrite to replace it)")
    if not os.path.isdir(parent):
        raise NotWritable(f"--output {path}: cannot write there (directory {parent} does not exist)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NotWritable(f"--output {path}: cannot write there ({parent} is not writable)")


def save(module, path: str, classifier_json: str) -> None:
    """Writes the SavedModel beside PATH and renames it into place: a reader finds the old directory, or the
    new one whole (an old one is moved aside first, so for that moment PATH is absent)."""
    import tensorflow as tf

    parent, name = os.path.split(os.path.abspath(path))
    staging, old = (os.path.join(parent, f".{name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                    for what in ("staging", "old"))
    try:
        os.mkdir(staging)  # with the user's usual mode, as the SavedModel's directory will have
        tf.saved_model.save(module, staging, signatures={"serving_default": module.classify})
        os.mkdir(os.path.join(staging, EXTRA))
        shutil.copyfile(classifier_json, os.path.join(staging, EXTRA, os.path.basename(classifier_json)))
        if os.path.isdir(path) and os.listdir(path):
            os.rename(path, old)
        os.rename(staging, path)  # replaces an empty directory
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def load(classifier_path: str, model_dir: str = ""):
    """(the classifier, a Featurizer of the model it was fitted on): MODEL_DIR, or the model dir the classifier
    names, checked to hold those weights. InputError, FileNotFoundError or CheckpointError in one line otherwise."""
    from horovod_mlstm.inference import Featurizer

    classifier = Classifier.load(classifier_path)
    if not model_dir:
        model_dir = classifier.info["model_dir"]
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"the classifier names the model dir {model_dir}, which does not exist "
                                    "(moved?): pass --model_dir")
    featurizer = Featurizer(model_dir, **classifier.featurization)
    classifier.check(featurizer)
    return classifier, featurizer


def main(argv):
    from horovod_mlstm import distributed as dist
    from horovod_mlstm.checkpoint import CheckpointError
    from horovod_mlstm.serving import ServingModel

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    dist.init(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    try:
        check_output(FLAGS.output, FLAGS.overwrite)
        classifier, featurizer = load(FLAGS.classifier, FLAGS.model_dir)
        module = ServingModel(featurizer.model, classifier, FLAGS.batch_size_per_worker, FLAGS.seq_length)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    classifier_json = FLAGS.classifier
    if os.path.isdir(classifier_json):
        classifier_json = os.path.join(classifier_json, JSON_NAME)
    try:
        save(module, FLAGS.output, classifier_json)
    except OSError as e:
        sys.exit(f"error: cannot write --output {FLAGS.output}: {e.strerror or e}")
    settings = classifier.featurization
    print(f"[export] {len(classifier.labels)} classes ({', '.join(classifier.labels)}), {settings['text_prep']} prep, "
          f"{settings['readout']} of {featurizer.model_dir}: SavedModel in {FLAGS.output}\n"
          f"[export] call it with TensorFlow alone: m = tf.saved_model.load({FLAGS.output!r}); "
          f"m.signatures['serving_default'](texts=tf.constant([...]))['probabilities'] (columns: m.labels)",
          flush=True)


if __name__ == "__main__":
    from horovod_mlstm.flags import define_common

    define_common()
    flags.FLAGS.set_default("model_dir", "")
    flags.DEFINE_string("classifier", None, "classifier.json written by transfer, or the directory holding it.")
    flags.DEFINE_string("output", None, "Directory to write the SavedModel to.")
    flags.DEFINE_bool("overwrite", False, "Replace --output when it is a directory that is not empty.")
    flags.mark_flags_as_required(["classifier", "output"])
    app.run(main)
