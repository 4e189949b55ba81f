"""The evaluate CLI: BPC over a whole split, in one process and across two ranks."""

import json

import numpy as np
import pytest

from conftest import horovodrun, last_line, python
from horovod_mlstm import data, distributed as dist
from horovod_mlstm.evaluate import bits_per_char
from horovod_mlstm.inference import load_trained_model


def test_cli_matches_in_process_bpc(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "eval.json"
    proc = python("-m", "horovod_mlstm.evaluate", f"--model_dir={tiny_model_dir}", f"--data_dir={tiny_data}",
                  "--split=test", "--batch_size_per_worker=4", "--seq_length=32", f"--output={out}", check=True)
    result = json.loads(out.read_text())
    assert "bits per character" in proc.stdout
    assert 0 < result["bytes_scored"] <= result["bytes_in_split"]
    assert result["bytes_in_split"] - result["bytes_scored"] < 4 * 33  # only stream tails go unscored
    dist.init()  # one in-process rank, for the reference computation
    streams = data.rank_streams(str(tiny_data), "test", 4, 32)
    assert result["bpc"] == pytest.approx(bits_per_char(load_trained_model(str(tiny_model_dir)), streams), rel=1e-5)
    assert 0 < result["bpc"] < 8.5


def test_two_ranks_share_the_split(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "eval2.json"
    horovodrun(2, "-m", "horovod_mlstm.evaluate", f"--model_dir={tiny_model_dir}", f"--data_dir={tiny_data}",
               "--split=test", "--batch_size_per_worker=4", "--seq_length=32", f"--output={out}", check=True)
    result = json.loads(out.read_text())
    assert result["ranks"] == 2 and result["bytes_scored"] > 0.95 * result["bytes_in_split"]
    assert np.isfinite(result["bpc"])


def test_missing_checkpoint_and_split(tmp_path, tiny_model_dir):
    proc = python("-m", "horovod_mlstm.evaluate", f"--model_dir={tmp_path}", "--split=test")
    assert proc.returncode != 0 and "no trained model" in last_line(proc.stderr)
    proc = python("-m", "horovod_mlstm.evaluate", f"--model_dir={tiny_model_dir}", f"--data_dir={tmp_path}")
    assert proc.returncode != 0 and "no test shards" in last_line(proc.stderr)
