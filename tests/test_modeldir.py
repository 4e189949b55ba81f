"""modeldir.py: one job per model dir, configs that must match, whole model writes, loading and identity."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from horovod_mlstm import modeldir
from horovod_mlstm.model import ModelConfig, build_model

pytestmark = pytest.mark.unit

TINY = ModelConfig(hidden_size=8, embed_size=4)


def test_a_second_lock_is_refused_naming_the_holder_and_freed_with_it(tmp_path):
    held = modeldir.Lock(str(tmp_path)).acquire("job-a")
    with pytest.raises(modeldir.ModelDirBusy) as busy:
        modeldir.Lock(str(tmp_path)).acquire("job-b")
    assert f"in use by pid {os.getpid()} on " in str(busy.value) and busy.value.token == "job-a"
    held.release()
    modeldir.Lock(str(tmp_path)).acquire("job-b").release()


def test_a_lock_dies_with_its_process(tmp_path):
    """kill -9 of the holder frees the lock at once: a restart is never blocked by a dead job."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from horovod_mlstm import modeldir; "
                               f"lock = modeldir.Lock({str(tmp_path)!r}).acquire('dead'); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(modeldir.ModelDirBusy, match=f"pid {holder.pid} "):
        modeldir.Lock(str(tmp_path)).acquire("new")
    holder.kill()
    holder.wait()
    modeldir.Lock(str(tmp_path)).acquire("new").release()


def test_create_refuses_another_architecture_and_an_unwritable_place(tmp_path):
    modeldir.create(str(tmp_path / "m"), TINY)
    modeldir.write_config(str(tmp_path / "m"), TINY)
    modeldir.create(str(tmp_path / "m"), TINY)  # the same model: fine
    with pytest.raises(ValueError, match="holds a different model"):
        modeldir.create(str(tmp_path / "m"), ModelConfig(hidden_size=16, embed_size=4))
    modeldir.create(str(tmp_path / "m"), dataclasses.replace(TINY, precision="mixed_bfloat16"))  # weights are float32
    with pytest.raises(ValueError, match="trained with --precision=fp32, whose checkpoints lack float16's loss scale"):
        modeldir.create(str(tmp_path / "m"), dataclasses.replace(TINY, precision="mixed_float16"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot create --model_dir"):
        modeldir.create(str(tmp_path / "file" / "m"), TINY)


def test_read_config_says_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        modeldir.read_config(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden_size": 8, "colour": "red"}')
    with pytest.raises(ValueError, match="not a model config written by this project"):
        modeldir.read_config(str(tmp_path))


def test_written_models_load_with_their_identity(tmp_path):
    model = build_model(TINY)
    target = str(tmp_path / "m")
    modeldir.write_model(target, model, 7, "milestone.json", {"chars": 5})
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no staging left beside it
    assert json.loads((tmp_path / "m" / "milestone.json").read_text()) == {"chars": 5}
    loaded, checkpoint = modeldir.load(target)
    assert checkpoint.endswith("ckpt-7") and loaded.config == TINY
    for a, b in zip(model.variables, loaded.variables):
        assert (a.numpy() == b.numpy()).all()
    identity = modeldir.identity(target, checkpoint)
    os.rename(target, tmp_path / "moved")
    assert modeldir.same_weights(identity, modeldir.identity(str(tmp_path / "moved"), checkpoint.replace("/m/", "/moved/")))
    assert modeldir.checkpoint_value(str(tmp_path / "moved" / "checkpoints" / "ckpt-7"), "streams") is None


def test_write_model_without_replace_never_overwrites(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(OSError):
        modeldir.write_model(str(tmp_path / "m"), build_model(TINY), 0, replace=False)
    assert os.listdir(tmp_path / "m") == ["notes.txt"] and os.listdir(tmp_path) == ["m"]


def test_earlier_history_keeps_the_points_up_to_the_resumed_step(tmp_path):
    assert modeldir.earlier_history(str(tmp_path), 10) == []  # no summary yet
    (tmp_path / "summary.json").write_text(json.dumps({"history": [{"step": 5}, {"step": 10}, {"step": 15}]}))
    assert modeldir.earlier_history(str(tmp_path), 10) == [{"step": 5}, {"step": 10}]
    (tmp_path / "summary.json").write_text("{half")
    assert modeldir.earlier_history(str(tmp_path), 10) == []  # unreadable: a warning, and the curve restarts
