"""The evaluate CLI: BPC over a whole split, in one process and across two ranks."""

import json
import shutil

import numpy as np
import pytest

from conftest import horovodrun, last_line, python
from horovod_mlstm import data, distributed as dist
from horovod_mlstm.inference import load_trained_model
from horovod_mlstm.metrics import bits_per_char, xent


@pytest.mark.cli
def test_cli_matches_in_process_bpc(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "eval.json"
    proc = python("-m", "horovod_mlstm.evaluate", f"--model_dir={tiny_model_dir}", f"--data_dir={tiny_data}",
                  "--split=test", "--batch_size_per_worker=4", "--seq_length=32", f"--output={out}", check=True)
    result = json.loads(out.read_text())
    assert "bits per character" in proc.stdout
    assert 0 < result["bytes_scored"] <= result["bytes_in_split"]
    # Unscored: the first byte of each of the 4 streams and the < 4 bytes that do not fill a stream.
    assert 4 <= result["bytes_in_split"] - result["bytes_scored"] < 2 * 4
    dist.init()  # one in-process rank, for the reference computation
    streams = data.split_streams(str(tiny_data), "test", 4, 32)
    assert result["bpc"] == pytest.approx(bits_per_char(load_trained_model(str(tiny_model_dir)), streams), rel=1e-5)
    assert 0 < result["bpc"] < 8.5


@pytest.mark.unit
def test_full_pass_equals_each_stream_scored_in_one_call(tiny_model_dir):
    """Windows with the state carried, plus the tail, score exactly what one long call does.

    Each stream is 80 bytes: two windows of 32 take 65 of them, and the 15-byte tail is a byte
    the corpus never holds, so leaving the tail out would change the BPC by far more than 1e-5.
    """
    dist.init()
    text = np.frombuffer(b"Great sound. I use it at home and at church on Sundays, and it works!"[:65], np.uint8)
    stream = np.concatenate([text, np.full(15, 0xFE, np.uint8)])
    streams = data.ByteStreams(np.tile(stream, 4), rows=4, seq_length=32)
    assert streams.windows_per_epoch == 2 and streams.tail()[1].shape == (4, 15)
    model = load_trained_model(str(tiny_model_dir))
    block = streams.streams.astype(np.int32)
    logits, _ = model(block[:, :-1], model.zero_state(4))
    expected = xent(block[:, 1:], logits).numpy().mean() / np.log(2)
    assert bits_per_char(model, streams) == pytest.approx(expected, rel=1e-5)
    assert bits_per_char(model, streams, windows=2) != pytest.approx(expected, rel=1e-3)  # the tail counts


@pytest.mark.multiproc
def test_two_ranks_share_the_split_and_score_as_one_rank_with_their_streams(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "eval2.json"
    horovodrun(2, "-m", "horovod_mlstm.evaluate", f"--model_dir={tiny_model_dir}", f"--data_dir={tiny_data}",
               "--split=test", "--batch_size_per_worker=4", "--seq_length=32", f"--output={out}", check=True)
    result = json.loads(out.read_text())
    assert result["ranks"] == 2 and 8 <= result["bytes_in_split"] - result["bytes_scored"] < 16
    # One stream layout whatever the world size: 2 ranks x 4 streams score what 1 rank x 8 does.
    dist.init()
    streams = data.split_streams(str(tiny_data), "test", 8, 32)
    assert result["bpc"] == pytest.approx(bits_per_char(load_trained_model(str(tiny_model_dir)), streams), rel=1e-5)


@pytest.mark.cli
@pytest.mark.parametrize("output, message", [("missing_dir/eval.json", "does not exist"), (".", "is a directory")])
def test_unwritable_output_fails_before_the_work(tmp_path, tiny_model_dir, tiny_data, output, message):
    proc = python("-m", "horovod_mlstm.evaluate", f"--model_dir={tiny_model_dir}", f"--data_dir={tiny_data}",
                  "--split=test", "--batch_size_per_worker=4", "--seq_length=32", f"--output={tmp_path / output}")
    assert proc.returncode != 0 and message in last_line(proc.stderr) and "--output" in last_line(proc.stderr)
    assert "bits per character" not in proc.stdout


@pytest.mark.cli
def test_missing_checkpoint_and_split(tmp_path, tiny_model_dir):
    proc = python("-m", "horovod_mlstm.evaluate", f"--model_dir={tmp_path}", "--split=test")
    assert proc.returncode != 0 and "no trained model" in last_line(proc.stderr)
    proc = python("-m", "horovod_mlstm.evaluate", f"--model_dir={tiny_model_dir}", f"--data_dir={tmp_path}")
    assert proc.returncode != 0 and "no manifest.json in" in last_line(proc.stderr)


@pytest.mark.cli
def test_checkpoint_that_does_not_fit_config_is_the_last_line(tmp_path, tiny_model_dir):
    """An edited config.json: one error line at the end, not buried under TF's teardown warnings."""
    model_dir = tmp_path / "edited"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] + 1}))
    proc = python("-m", "horovod_mlstm.evaluate", f"--model_dir={model_dir}", "--split=test")
    assert proc.returncode != 0 and "does not fit the model config.json describes" in last_line(proc.stderr)
    assert "being deleted with unrestored values" not in proc.stderr
