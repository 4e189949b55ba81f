"""OpenAI's release layout imports into a model that computes what OpenAI's encoder.py computes.

The real 350 MB files are not on this machine, so random weights are written in the release's
exact layout (15 .npy files, wh in four column blocks) and the imported model is compared with an
independent NumPy implementation of OpenAI's equations that reads the .npy files directly.
"""

import os

import numpy as np
import pytest

from conftest import last_line, python

HIDDEN, EMBED = 32, 8
TEXT = "Great strings, cheap tuners. Würde ich wieder kaufen — 5/5 ★"


def write_release(npy_dir, hidden=HIDDEN, embed=EMBED, seed=0):
    """Random weights in the release's file layout, scaled so the gates are neither saturated nor flat."""
    rng = np.random.default_rng(seed)
    n, e = hidden, embed
    shapes = [(256, e), (e, 4 * n), (n, n), (n, n), (n, n), (n, n), (e, n), (n, n), (4 * n,), (4 * n,),
              (4 * n,), (n,), (n,), (n, 256), (256,)]
    os.makedirs(npy_dir, exist_ok=True)
    for index, shape in enumerate(shapes):
        if index in (9, 10, 11, 12):  # weight-norm gains: positive, not all equal
            array = rng.uniform(0.5, 2.0, shape)
        else:
            array = rng.normal(0.0, 0.5, shape)
        np.save(os.path.join(npy_dir, f"{index}.npy"), array.astype(np.float32))


def openai_reference(npy_dir, data: bytes):
    """OpenAI's encoder.py equations in float64, straight from the files: final (h, c), log-probs per byte."""
    p = [np.load(os.path.join(npy_dir, f"{i}.npy")).astype(np.float64) for i in range(15)]
    embedding, wx, wh = p[0], p[1], np.concatenate(p[2:6], axis=1)
    wmx, wmh, b, gx, gh, gmx, gmh, w_out, b_out = p[6:]

    def weight_norm(w, g):
        return w / np.sqrt((w * w).sum(axis=0)) * g

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    wx, wh, wmx, wmh = weight_norm(wx, gx), weight_norm(wh, gh), weight_norm(wmx, gmx), weight_norm(wmh, gmh)
    h = c = np.zeros(wmh.shape[0])
    log_probs = []
    for byte in data:
        x = embedding[byte]
        m = (x @ wmx) * (h @ wmh)
        i, f, o, u = np.split(x @ wx + m @ wh + b, 4)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(u)
        h = sigmoid(o) * np.tanh(c)
        logits = h @ w_out + b_out
        log_probs.append(logits - logits.max() - np.log(np.exp(logits - logits.max()).sum()))
    return h, c, np.array(log_probs)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    write_release(root / "npy")
    (root / "model").mkdir()  # an empty directory is a fine target
    python("-m", "horovod_mlstm.import_openai", f"--npy_dir={root / 'npy'}", f"--model_dir={root / 'model'}",
           check=True)
    return root


@pytest.mark.unit
def test_imported_model_computes_openai_equations(imported):
    import tensorflow as tf

    from horovod_mlstm.inference import encode, load_trained_model

    model = load_trained_model(str(imported / "model"))
    assert (model.config.hidden_size, model.config.embed_size) == (HIDDEN, EMBED)
    data = encode(TEXT)
    h_ref, c_ref, log_probs_ref = openai_reference(imported / "npy", data)
    logits, (h, c) = model(tf.constant([list(data)], tf.int32), model.zero_state(1))
    log_probs = tf.nn.log_softmax(logits[0]).numpy()
    assert log_probs.shape == (len(data), 256)
    np.testing.assert_allclose(log_probs, log_probs_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h.numpy()[0], h_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(c.numpy()[0], c_ref, atol=1e-5, rtol=1e-5)
    assert np.abs(c_ref).max() > 0.1  # the comparison is not between two near-zero states


@pytest.mark.cli
def test_imported_model_works_with_the_tools(imported):
    proc = python("-m", "horovod_mlstm.generate", f"--model_dir={imported / 'model'}", "--prime=Great",
                  "--length=20", "--seed=1", check=True)
    assert len(proc.stdout.rstrip("\n")) == len("Great") + 20


@pytest.mark.cli
def test_refuses_to_overwrite_a_model(imported):
    before = sorted(os.listdir(imported / "model" / "checkpoints"))
    proc = python("-m", "horovod_mlstm.import_openai", f"--npy_dir={imported / 'npy'}",
                  f"--model_dir={imported / 'model'}")
    assert proc.returncode != 0
    assert "already holds a model" in last_line(proc.stderr) and "Traceback" not in proc.stderr
    assert sorted(os.listdir(imported / "model" / "checkpoints")) == before


def release_error(npy_dir, model_dir):
    """The one error line of an import, checked in-process (no TensorFlow start-up per case)."""
    from horovod_mlstm.import_openai import ReleaseError, import_release

    with pytest.raises(ReleaseError) as caught:
        import_release(str(npy_dir), str(model_dir))
    assert not os.path.exists(model_dir)  # nothing half-written
    assert not [name for name in os.listdir(os.path.dirname(model_dir)) if ".import-" in name]
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.unit
@pytest.mark.parametrize("damage, expected", [
    (lambda d: os.remove(d / "9.npy"), "9.npy is missing (mLSTM weight-norm gain gx)"),
    (lambda d: np.save(d / "13.npy", np.zeros((HIDDEN, 255), np.float32)),
     "13.npy (output kernel) has shape (32, 255), expected (32, 256)"),
    (lambda d: np.save(d / "4.npy", np.zeros((HIDDEN, HIDDEN + 1), np.float32)),
     "4.npy (mLSTM wh, column block 3 of 4) has shape (32, 33), expected (32, 32)"),
    (lambda d: np.save(d / "7.npy", np.zeros((HIDDEN, 4 * HIDDEN), np.float32)), "7.npy (mLSTM wmh) has shape"),
    (lambda d: np.save(d / "8.npy", np.zeros(4 * HIDDEN, np.int64)), "8.npy (mLSTM bias b) holds int64"),
    (lambda d: np.save(d / "11.npy", np.full(HIDDEN, np.nan, np.float32)), "11.npy (mLSTM weight-norm gain gmx) "
     "holds NaN"),
    (lambda d: (d / "14.npy").write_text("version https://git-lfs.github.com/spec/v1\n"), "14.npy is not a "
     "readable .npy file"),
    (lambda d: np.save(d / "2.npy", np.array([{"a": 1}], object)), "2.npy is not a readable .npy file"),
])
def test_a_bad_release_file_is_named(tmp_path, damage, expected):
    write_release(tmp_path / "npy")
    damage(tmp_path / "npy")
    assert expected in release_error(tmp_path / "npy", tmp_path / "model")


@pytest.mark.unit
def test_sizes_are_inferred_from_the_files(tmp_path):
    from horovod_mlstm.import_openai import read_release

    write_release(tmp_path / "npy", hidden=12, embed=5)
    config, arrays = read_release(str(tmp_path / "npy"))
    assert (config.hidden_size, config.embed_size) == (12, 5)
    assert [a.dtype for a in arrays] == [np.float32] * 15


@pytest.mark.cli
def test_cli_error_is_one_line(tmp_path):
    write_release(tmp_path / "npy")
    os.remove(tmp_path / "npy" / "0.npy")
    proc = python("-m", "horovod_mlstm.import_openai", f"--npy_dir={tmp_path / 'npy'}",
                  f"--model_dir={tmp_path / 'model'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr).startswith("error: ") and "0.npy is missing" in last_line(proc.stderr)
    assert not os.path.exists(tmp_path / "model")


@pytest.mark.unit
def test_non_empty_target_is_refused(tmp_path):
    write_release(tmp_path / "npy")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    from horovod_mlstm.import_openai import ReleaseError, import_release

    with pytest.raises(ReleaseError, match="is not empty"):
        import_release(str(tmp_path / "npy"), str(tmp_path / "model"))
    assert os.listdir(tmp_path / "model") == ["notes.txt"]


@pytest.mark.unit
def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from horovod_mlstm.checkpoint import Checkpointer

    def disk_full(self, step):
        raise OSError(28, "No space left on device")

    write_release(tmp_path / "npy")
    monkeypatch.setattr(Checkpointer, "save", disk_full)
    assert "No space left on device" in release_error(tmp_path / "npy", tmp_path / "model")
