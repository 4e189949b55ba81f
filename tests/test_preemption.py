"""Preemption and time limits: a signal or --max_runtime_minutes stops every rank at the same step,
rank 0 checkpoints, the job exits 75, and the same command resumes to the uninterrupted result."""

from __future__ import annotations

import pytest

import json
import os
import signal
import subprocess
import time

import tensorflow as tf

from conftest import ENV, PYTHON, REPO, TINY_MODEL_FLAGS, assert_same_weights, horovodrun, python

pytestmark = pytest.mark.multiproc

FLAGS = [*TINY_MODEL_FLAGS, "--hidden_size=48", "--train_steps=240", "--checkpoint_every=100", "--log_every=10"]


def start(cmd, log):
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(log, text, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in log.read_text():
            return
        assert proc.poll() is None, f"job ended ({proc.returncode}) before {text!r}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {text!r}:\n{log.read_text()[-3000:]}")


def stopped_step(text: str) -> int:
    return int(text.split("[train] stopped at step ")[1].split()[0])


def test_sigterm_to_the_launcher_stops_both_ranks_and_the_rerun_matches(tmp_path, tiny_data):
    data = f"--data_dir={tiny_data}"
    horovodrun(2, "train.py", *FLAGS, data, f"--model_dir={tmp_path}/straight", check=True, timeout=600)

    model_dir, log = tmp_path / "stopped", tmp_path / "log.txt"
    cmd = ["bash", "launch/horovodrun.sh", "--gloo", "--np", "2", *FLAGS, data, f"--model_dir={model_dir}"]
    proc = start(cmd, log)
    wait_for(log, "step 40/240", proc)
    proc.send_signal(signal.SIGTERM)  # what SLURM or a user's kill sends to the launcher
    assert proc.wait(60) == 75  # the launcher unwraps horovodrun's own status 1
    text = log.read_text()
    step = stopped_step(text)
    assert 40 <= step < 240 and "(SIGTERM)" in text and "run the same command to resume" in text
    assert "]<stderr>:Traceback" not in text  # none from the ranks (horovodrun itself reports their status 75)
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith(f"ckpt-{step}")
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["final_step"] == step and summary["stopped_early"] == "SIGTERM"

    resumed = subprocess.run(cmd[:-1] + [f"--model_dir={model_dir}"], cwd=REPO, env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"at step {step}" in resumed.stdout
    assert_same_weights(tmp_path / "straight", model_dir)


def test_second_signal_during_the_stop_and_the_time_limit(tmp_path, tiny_data):
    data = f"--data_dir={tiny_data}"
    model_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start([PYTHON, "train.py", *FLAGS, data, f"--model_dir={model_dir}"], log)
    wait_for(log, "step 30/240", proc)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # arrives while the first one's checkpoint is being written
    assert proc.wait(60) == 75
    step = stopped_step(log.read_text())
    assert "(SIGUSR1)" in log.read_text()
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    assert latest.endswith(f"ckpt-{step}")
    tf.train.load_checkpoint(latest).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")  # readable

    # The wall-clock limit stops the same way; the rerun continues from there.
    proc = python("train.py", *FLAGS, data, f"--model_dir={model_dir}", "--max_runtime_minutes=0.02")
    assert proc.returncode == 75 and "(--max_runtime_minutes)" in proc.stdout
    assert stopped_step(proc.stdout) > step

    python("train.py", *FLAGS, data, f"--model_dir={tmp_path}/straight", check=True)
    python("train.py", *FLAGS, data, f"--model_dir={model_dir}", check=True)
    assert_same_weights(tmp_path / "straight", model_dir)
    assert os.path.exists(model_dir / "summary.json")
