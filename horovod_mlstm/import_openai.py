"""OpenAI's released sentiment-neuron weights (Radford et al. 2017) as a model_dir of this project.

    python -m horovod_mlstm.import_openai --npy_dir generating-reviews-discovering-sentiment/model --model_dir M

openai/generating-reviews-discovering-sentiment ships its 4096-unit byte mLSTM as model/0.npy ...
14.npy, in the order its encoder.py creates variables (LAYOUT below). Its equations, gate order
(i, f, o, u), bias placement, weight norm (each column l2-normalised, times g, on the four mLSTM
matrices only) and kernel layout ([inputs, outputs]) are the ones model.py uses, so every array is
copied unchanged; only the hidden-to-gates matrix, released as four column blocks, is concatenated.
Sizes are inferred from the files, so smaller models saved in the same layout import too.

The result (config.json + checkpoints/) is written to a temporary directory beside --model_dir
and renamed into place, so a failed or interrupted import never leaves a half-written model_dir,
and an existing model is never overwritten.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

from horovod_mlstm import distributed as dist
from horovod_mlstm import modeldir
from horovod_mlstm.checkpoint import CheckpointError
from horovod_mlstm.flags import define_common
from horovod_mlstm.model import VOCAB_SIZE, ModelConfig, build_model

# (what the file holds, its shape for embedding size e and hidden size n), file i.npy is LAYOUT[i].
LAYOUT = [
    ("byte embedding", lambda e, n: (VOCAB_SIZE, e)),
    ("mLSTM wx", lambda e, n: (e, 4 * n)),
    ("mLSTM wh, column block 1 of 4", lambda e, n: (n, n)),
    ("mLSTM wh, column block 2 of 4", lambda e, n: (n, n)),
    ("mLSTM wh, column block 3 of 4", lambda e, n: (n, n)),
    ("mLSTM wh, column block 4 of 4", lambda e, n: (n, n)),
    ("mLSTM wmx", lambda e, n: (e, n)),
    ("mLSTM wmh", lambda e, n: (n, n)),
    ("mLSTM bias b", lambda e, n: (4 * n,)),
    ("mLSTM weight-norm gain gx", lambda e, n: (4 * n,)),
    ("mLSTM weight-norm gain gh", lambda e, n: (4 * n,)),
    ("mLSTM weight-norm gain gmx", lambda e, n: (n,)),
    ("mLSTM weight-norm gain gmh", lambda e, n: (n,)),
    ("output kernel", lambda e, n: (n, VOCAB_SIZE)),
    ("output bias", lambda e, n: (VOCAB_SIZE,)),
]
EMBEDDING_FILE, HIDDEN_FILE = 0, 7  # the sizes are read from these: [256, e] and the square wmh [n, n]


class ReleaseError(Exception):
    """The release files or the target directory cannot be used; the message names which and why."""


def npy_path(npy_dir: str, index: int) -> str:
    return os.path.join(npy_dir, f"{index}.npy")


def _open(npy_dir: str, index: int) -> np.ndarray:
    """A memory map of file `index` (the header is read, the data only when used); never unpickles."""
    path = npy_path(npy_dir, index)
    if not os.path.isfile(path):
        raise ReleaseError(f"{path} is missing ({LAYOUT[index][0]}); --npy_dir must hold the release's "
                           f"{len(LAYOUT)} files 0.npy ... {len(LAYOUT) - 1}.npy (its model/ folder)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{path} is not a readable .npy file ({e})") from None


def inferred_sizes(npy_dir: str) -> tuple[int, int]:
    """(embedding size, hidden size) from the embedding [256, e] and the square wmh [n, n]."""
    embedding, wmh = _open(npy_dir, EMBEDDING_FILE), _open(npy_dir, HIDDEN_FILE)
    if embedding.ndim != 2 or embedding.shape[0] != VOCAB_SIZE or embedding.shape[1] < 1:
        raise ReleaseError(f"{npy_path(npy_dir, EMBEDDING_FILE)} ({LAYOUT[EMBEDDING_FILE][0]}) has shape "
                           f"{embedding.shape}, expected ({VOCAB_SIZE}, embedding size)")
    if wmh.ndim != 2 or wmh.shape[0] != wmh.shape[1] or wmh.shape[0] < 1:
        raise ReleaseError(f"{npy_path(npy_dir, HIDDEN_FILE)} ({LAYOUT[HIDDEN_FILE][0]}) has shape {wmh.shape}, "
                           "expected a square (hidden size, hidden size) matrix")
    return int(embedding.shape[1]), int(wmh.shape[0])


def read_release(npy_dir: str) -> tuple[ModelConfig, list[np.ndarray]]:
    """The model config and the 15 arrays as float32, each checked for presence, dtype, shape and finiteness."""
    if not os.path.isdir(npy_dir):
        raise ReleaseError(f"--npy_dir {npy_dir} is not a directory")
    embed_size, hidden_size = inferred_sizes(npy_dir)
    sizes = f"embedding size {embed_size} (from 0.npy) and hidden size {hidden_size} (from 7.npy)"
    arrays = []
    for index, (what, shape_of) in enumerate(LAYOUT):
        array, path = _open(npy_dir, index), npy_path(npy_dir, index)
        if not np.issubdtype(array.dtype, np.floating):
            raise ReleaseError(f"{path} ({what}) holds {array.dtype}, expected floating-point weights")
        expected = shape_of(embed_size, hidden_size)
        if array.shape != expected:
            raise ReleaseError(f"{path} ({what}) has shape {array.shape}, expected {expected} for {sizes}")
        try:
            array = np.asarray(array, np.float32)
        except (OSError, ValueError) as e:  # a file truncated after its header
            raise ReleaseError(f"{path} ({what}) cannot be read ({e})") from None
        if not np.isfinite(array).all():
            raise ReleaseError(f"{path} ({what}) holds NaN or infinite values")
        arrays.append(array)
    return ModelConfig(hidden_size=hidden_size, embed_size=embed_size, weight_norm=True, precision="fp32"), arrays


def check_target(model_dir: str) -> None:
    """Refuses a model_dir that holds anything, above all a model: the import writes only new directories."""
    if os.path.exists(os.path.join(model_dir, "config.json")) or os.path.exists(os.path.join(model_dir, "checkpoints")):
        raise ReleaseError(f"--model_dir {model_dir} already holds a model (config.json or checkpoints/); "
                           "refusing to overwrite it: choose a new directory")
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise ReleaseError(f"--model_dir {model_dir} is a file, not a directory")
    if os.path.isdir(model_dir) and os.listdir(model_dir):
        raise ReleaseError(f"--model_dir {model_dir} is not empty; the import writes only into a new or empty "
                           "directory")


def assign(model, arrays: list[np.ndarray]) -> None:
    """Copies the release's arrays into the model's variables (same layouts; wh concatenated from its blocks)."""
    embedding, wx, *wh_blocks = arrays[:6]
    wmx, wmh, b, gx, gh, gmx, gmh, kernel, bias = arrays[6:]
    rnn = model.rnn
    pairs = [(model.embed.embeddings, embedding), (rnn.wx, wx), (rnn.wh, np.concatenate(wh_blocks, axis=1)),
             (rnn.wmx, wmx), (rnn.wmh, wmh), (rnn.b, b), (rnn.gx, gx), (rnn.gh, gh), (rnn.gmx, gmx),
             (rnn.gmh, gmh), (model.out.kernel, kernel), (model.out.bias, bias)]
    for variable, value in pairs:
        variable.assign(value)


def import_release(npy_dir: str, model_dir: str) -> ModelConfig:
    """Writes the release in npy_dir as a new model_dir that modeldir.load restores."""
    check_target(model_dir)
    config, arrays = read_release(npy_dir)
    model = build_model(config)
    assign(model, arrays)
    try:  # built beside model_dir and renamed into place: it replaces an empty directory, never a full one
        modeldir.write_model(model_dir, model, 0, replace=False)
    except (OSError, CheckpointError) as e:
        raise ReleaseError(f"cannot write {model_dir}: {getattr(e, 'strerror', None) or e}") from None
    return config


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if not FLAGS.npy_dir or not FLAGS["model_dir"].present:
        sys.exit("error: give --npy_dir (the release's model/ folder) and --model_dir (a new directory)")
    dist.init(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    try:
        config = import_release(FLAGS.npy_dir, FLAGS.model_dir)
    except ReleaseError as e:
        sys.exit(f"error: {e}")
    print(f"[import_openai] mLSTM with {config.hidden_size} units and a {config.embed_size}-wide byte embedding "
          f"imported from {FLAGS.npy_dir} into {FLAGS.model_dir}", flush=True)


if __name__ == "__main__":
    define_common()
    flags.DEFINE_string("npy_dir", None, "The release's model/ folder: 0.npy ... 14.npy.")
    app.run(main)
