"""Checkpoints: the newest readable one is restored; a damaged or half-written one never wins."""

import os

import numpy as np
import pytest
import tensorflow as tf

from horovod_mlstm.checkpoint import CheckpointError, Checkpointer

pytestmark = pytest.mark.unit


def make(tmp_path, value=0.0):
    v = tf.Variable(np.full([64], value, np.float32))
    return v, Checkpointer(str(tmp_path), keep=3, v=v)


def test_restores_newest(tmp_path):
    v, ckpt = make(tmp_path)
    for step in (1, 2):
        v.assign(np.full([64], step, np.float32))
        ckpt.save(step)
    v.assign(np.zeros([64], np.float32))
    assert ckpt.restore().endswith("ckpt-2")
    assert float(v[0]) == 2.0


def test_truncated_latest_falls_back_to_previous(tmp_path, caplog):
    v, ckpt = make(tmp_path)
    for step in (1, 2):
        v.assign(np.full([64], step, np.float32))
        ckpt.save(step)
    data = [f for f in os.listdir(ckpt.directory) if f.startswith("ckpt-2.data")]
    for f in data:
        with open(os.path.join(ckpt.directory, f), "r+b") as fh:
            fh.truncate(10)
    v2, ckpt2 = make(tmp_path, value=-1.0)
    path = ckpt2.restore()
    assert path.endswith("ckpt-1")
    assert float(v2[0]) == 1.0
    assert "ckpt-2 is unreadable" in caplog.text


def test_half_written_save_is_ignored(tmp_path):
    """Files of a save that died before updating the index are not picked up."""
    v, ckpt = make(tmp_path)
    v.assign(np.full([64], 1.0, np.float32))
    ckpt.save(1)
    index_before = open(os.path.join(ckpt.directory, "checkpoint")).read()
    # A killed save leaves its data behind but never rewrites the 'checkpoint' index last.
    v.assign(np.full([64], 2.0, np.float32))
    tf.train.Checkpoint(v=v).write(os.path.join(ckpt.directory, "ckpt-2"))
    assert open(os.path.join(ckpt.directory, "checkpoint")).read() == index_before
    v2, ckpt2 = make(tmp_path, value=-1.0)
    assert ckpt2.restore().endswith("ckpt-1") and float(v2[0]) == 1.0


def test_every_checkpoint_damaged_is_an_error(tmp_path):
    v, ckpt = make(tmp_path)
    ckpt.save(1)
    for f in os.listdir(ckpt.directory):
        if f.startswith("ckpt-1."):
            open(os.path.join(ckpt.directory, f), "wb").close()
    _, ckpt2 = make(tmp_path)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        ckpt2.restore()


def test_no_checkpoint(tmp_path):
    from horovod_mlstm import modeldir
    from horovod_mlstm.model import ModelConfig

    _, ckpt = make(tmp_path)
    assert ckpt.restore() is None
    modeldir.write_config(str(tmp_path), ModelConfig(hidden_size=8, embed_size=4))
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        modeldir.load(str(tmp_path))


def test_checkpoint_of_another_shape_is_an_error_not_damage(tmp_path):
    """An intact checkpoint that does not fit is reported at once, not skipped for an older one."""
    v, ckpt = make(tmp_path)
    for step in (1, 2):
        ckpt.save(step)
    _, other = make(tmp_path)
    other.checkpoint = tf.train.Checkpoint(v=tf.Variable(np.zeros([32], np.float32)))
    with pytest.raises(CheckpointError, match=r"ckpt-2 does not fit the model config.json describes"):
        other.restore()


@pytest.mark.parametrize("failure", [
    MemoryError(),
    OSError(5, "Input/output error"),
    tf.errors.UnavailableError(None, None, "the filesystem went away"),
    tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"),
])
def test_a_failure_that_is_not_damage_stops_instead_of_falling_back(tmp_path, monkeypatch, failure):
    """Falling back past an intact newest checkpoint would later overwrite it: only damage falls back."""
    v, ckpt = make(tmp_path)
    for step in (1, 2):
        ckpt.save(step)

    def failing_restore(path, *args, **kw):
        raise failure

    monkeypatch.setattr(ckpt.checkpoint, "restore", failing_restore)
    with pytest.raises(CheckpointError, match=r"cannot restore .*ckpt-2: .*not falling back"):
        ckpt.restore()
    assert sorted(os.path.basename(p) for p in ckpt.candidates()) == ["ckpt-1", "ckpt-2"]
