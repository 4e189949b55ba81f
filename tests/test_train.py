"""train.py: its error path, a real run, resume after kill -9, one job per model dir, and the order of an
elastic commit. Flag validation case by case is in test_flags.py (in process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import tensorflow as tf

from conftest import ENV, PYTHON, REPO, TINY_MODEL_FLAGS, assert_same_weights, last_line, python
from horovod_mlstm import hardware


@pytest.mark.cli
@pytest.mark.parametrize("args, message", [
    (["--no_such_flag=1"], "no_such_flag"),  # absl's own refusal
    (["--batch_size_per_worker=0"], "--batch_size_per_worker must be at least 1"),  # the config's
    (["--data_dir=/nonexistent/data"], "data directory '/nonexistent/data' does not exist"),  # the job's
])
def test_bad_flags_fail_fast_with_one_clear_line(tmp_path, args, message):
    proc = python("train.py", f"--model_dir={tmp_path}/m", *args, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors and message in errors[-1] or message in last_line(proc.stderr)
    assert not os.path.exists(tmp_path / "m" / "checkpoints")


@pytest.mark.cli
def test_trains_checkpoints_and_reports(tmp_path, tiny_data, fused_kernels):
    model_dir = tmp_path / "run"
    proc = python("train.py", f"--model_dir={model_dir}", f"--data_dir={tiny_data}", "--train_steps=60",
                  "--checkpoint_every=30", *TINY_MODEL_FLAGS, "--eval_every=30", check=True)
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["final_step"] == 60 and summary["world_size"] == 1
    assert summary["val_bpc"] < 7.0, summary  # an untrained byte model is at 8 bits
    assert summary["history"][0]["val_bpc"] > summary["history"][-1]["val_bpc"]
    assert summary["chars_seen"] == 60 * 4 * 32
    assert summary["replicas_in_sync"] is True
    assert "[train] step 60/60" in proc.stdout and "lr " in proc.stdout and "chars/s" in proc.stdout
    assert "gate math: fused CPU kernels" in proc.stdout  # the job runs the kernels make setup built
    assert sorted(os.listdir(model_dir / "checkpoints"))[0].startswith("checkpoint")
    assert (model_dir / "config.json").exists() and list((model_dir / "tensorboard").iterdir())

    # Running again with the same model_dir and a later --train_steps resumes; a truncated newest
    # checkpoint is reported in one line and the previous one is used; a different model is refused.
    ckpts = model_dir / "checkpoints"
    for f in ckpts.glob("ckpt-60.data-*"):
        f.write_bytes(f.read_bytes()[:100])
    proc = python("train.py", f"--model_dir={model_dir}", f"--data_dir={tiny_data}", "--train_steps=65",
                  *TINY_MODEL_FLAGS, check=True)
    assert "ckpt-60 is unreadable" in proc.stderr and "trying the previous one" in proc.stderr
    assert "at step 30" in proc.stdout
    assert json.loads((model_dir / "summary.json").read_text())["final_step"] == 65
    proc = python("train.py", f"--model_dir={model_dir}", f"--data_dir={tiny_data}", "--train_steps=70",
                  *TINY_MODEL_FLAGS, "--hidden_size=48")
    assert proc.returncode != 0 and "holds a different model" in last_line(proc.stderr)


@pytest.mark.multiproc
def test_kill_9_and_resume_reaches_the_uninterrupted_weights(tmp_path, tiny_data):
    flags = [f"--data_dir={tiny_data}", "--train_steps=300", "--checkpoint_every=10", *TINY_MODEL_FLAGS,
             "--hidden_size=64", "--seq_length=64", "--batch_size_per_worker=8"]
    python("train.py", f"--model_dir={tmp_path}/straight", *flags, check=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([PYTHON, "train.py", f"--model_dir={killed}", *flags], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not tf.train.latest_checkpoint(str(killed / "checkpoints")):
        time.sleep(0.05)
    time.sleep(0.3)  # well inside a later step or save
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"

    resumed = python("train.py", f"--model_dir={killed}", *flags, check=True)
    step = int(resumed.stdout.split("at step ")[1].split()[0])
    assert 10 <= step < 300
    assert json.loads((killed / "summary.json").read_text())["final_step"] == 300
    assert_same_weights(tmp_path / "straight", killed)


@pytest.mark.cli
def test_eval_batch_size_fixes_the_validation_streams(tmp_path, tiny_data):
    """With --eval_batch_size the validation BPC is the one the evaluate CLI gives with that many
    streams (and not with the training batch's), so runs with different batches compare."""
    model_dir = tmp_path / "run"
    python("train.py", f"--model_dir={model_dir}", f"--data_dir={tiny_data}", "--train_steps=100",
           *TINY_MODEL_FLAGS, "--learning_rate=1e-2", "--eval_batch_size=2", "--eval_windows=0", check=True)
    val_bpc = json.loads((model_dir / "summary.json").read_text())["val_bpc"]

    def evaluate(streams):
        out = tmp_path / f"eval{streams}.json"
        python("-m", "horovod_mlstm.evaluate", f"--model_dir={model_dir}", f"--data_dir={tiny_data}", "--split=val",
               f"--batch_size_per_worker={streams}", "--seq_length=32", f"--output={out}", check=True)
        return json.loads(out.read_text())["bpc"]

    assert val_bpc == pytest.approx(evaluate(2), rel=1e-5)
    assert val_bpc < 6.0  # a model that uses context, so where streams start matters
    assert val_bpc != pytest.approx(evaluate(64), rel=1e-4)  # 64 shorter streams score differently


@pytest.mark.cli
def test_milestones_are_model_dirs_kept_at_character_counts(tmp_path, tiny_data):
    """--milestone_chars keeps the model at those character counts (4 x 32 = 128 chars per step here),
    as model dirs that evaluate reads, while the rotating checkpoints keep only the last one."""
    model_dir = tmp_path / "run"
    python("train.py", f"--model_dir={model_dir}", f"--data_dir={tiny_data}", "--train_steps=12",
           "--checkpoint_every=4", "--keep_checkpoints=1", "--milestone_chars=256,1e3,1500", *TINY_MODEL_FLAGS,
           check=True)
    found = sorted((model_dir / "milestones").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in found] == ["chars-256", "chars-1000", "chars-1500"]
    steps = [json.loads((p / "milestone.json").read_text())["step"] for p in found]
    assert steps == [2, 8, 12]  # the first step at which that many characters were seen
    out = tmp_path / "eval.json"
    python("-m", "horovod_mlstm.evaluate", f"--model_dir={found[0]}", f"--data_dir={tiny_data}", "--split=val",
           "--batch_size_per_worker=4", "--seq_length=32", f"--output={out}", check=True)
    assert json.loads(out.read_text())["bpc"] > json.loads((model_dir / "summary.json").read_text())["val_bpc"]


@pytest.mark.multiproc
def test_a_second_job_on_a_model_dir_is_refused_and_a_killed_one_blocks_nothing(tmp_path, tiny_data):
    """Two jobs on one --model_dir would delete each other's checkpoints: the second is refused in one line
    naming the first, which trains on; once the first is killed with -9, the same command resumes."""
    model_dir = tmp_path / "run"
    flags = [f"--model_dir={model_dir}", f"--data_dir={tiny_data}", "--checkpoint_every=5", *TINY_MODEL_FLAGS]
    first = subprocess.Popen([PYTHON, "train.py", *flags, "--train_steps=100000"], cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not tf.train.latest_checkpoint(str(model_dir / "checkpoints")):
            assert first.poll() is None and time.time() < deadline, "the first job did not reach a checkpoint"
            time.sleep(0.1)
        second = python("train.py", *flags, "--train_steps=20", "--checkpoint_every=1", timeout=300)
        assert second.returncode != 0
        assert last_line(second.stderr).startswith(f"error: --model_dir {model_dir} is in use by pid {first.pid} on ")
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    resumed = python("train.py", *flags, "--train_steps=100000", "--max_runtime_minutes=0.001", timeout=300)
    assert resumed.returncode == 75 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]


@pytest.mark.unit
def test_an_elastic_commit_keeps_the_previous_commits_state_until_it_is_done(tmp_path):
    """A worker lost during the checkpoint before a commit rolls every rank back to the previous commit,
    whose RNN state must therefore still be on disk when commit() runs; it goes only afterwards."""
    from horovod_mlstm import distributed as dist
    from horovod_mlstm import train
    from horovod_mlstm.flags import TrainConfig
    from horovod_mlstm.model import build_model

    dist.init()
    cfg = TrainConfig(model_dir=str(tmp_path), hidden_size=8, embed_size=4, batch_size_per_worker=2,
                      checkpoint_every=20, commit_every=10, train_steps=100, warmup_steps=1, elastic=True,
                      precision="fp32")
    model = build_model(cfg.model_config())
    schedule, optimizer = train.build_optimizer(cfg, 1e-3, model.trainable_variables)
    state = train.TrainState(2, 8)
    streams = train.Streams(cfg.data_path, 2, 2, cfg.seq_length)
    checkpoints = train.Checkpoints(cfg, model, optimizer, state, streams)
    checkpoints.load_state(0, 2)
    job = train.Job(cfg, streams, model, optimizer, schedule, 1e-3, state, checkpoints, None, None, None, None)
    progress = train.Progress(first_step=0, history=[], last_checkpoint=None, resumed_from=None, last_commit=0)
    on_disk_at_commit = []

    class Elastic:
        world_steps = {}

        def commit(self):
            on_disk_at_commit.append(sorted(p.name for p in (tmp_path / "checkpoints").glob("rnn_state-*")))

    for step in (10, 20):
        state.step.assign(step)
        train.save_checkpoint(job, progress, 0, 2, False, Elastic(), {1: step})
    assert on_disk_at_commit == [["rnn_state-10"], ["rnn_state-10", "rnn_state-20"]]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("rnn_state-*")) == ["rnn_state-20"]
    assert progress.last_commit == 20


@pytest.mark.cli
def test_auto_precision_is_the_first_line_and_a_model_continues_in_another_precision(tmp_path, tiny_data):
    """Under ONEDNN_MAX_CPU_ISA=AVX2 no CPU computes bf16 natively, so auto chooses fp32 on any machine
    without a GPU; the fp32 model then continues in bf16, warned about where this CPU emulates it."""
    model_dir = tmp_path / "m"
    flags = [f"--model_dir={model_dir}", f"--data_dir={tiny_data}", *TINY_MODEL_FLAGS]
    flags.remove("--precision=fp32")
    auto = python("train.py", *flags, "--train_steps=3", env={"ONEDNN_MAX_CPU_ISA": "AVX2"}, check=True)
    assert auto.stdout.splitlines()[0].startswith("[train] precision fp32 (--precision=auto: "), auto.stdout
    assert json.loads((model_dir / "summary.json").read_text())["precision"] == "fp32"
    bf16 = python("train.py", *flags, "--train_steps=6", "--precision=mixed_bfloat16", check=True)
    slow = hardware.emulated("mixed_bfloat16", hardware.describe())
    assert bf16.stdout.splitlines()[0] == (f"[train] warning: --precision=mixed_bfloat16 is emulated here ({slow}); "
                                           "--precision=auto would choose fp32" if slow
                                           else "[train] precision mixed_bfloat16 (as asked)"), bf16.stdout
    summary = json.loads((model_dir / "summary.json").read_text())
    assert (summary["precision"], summary["final_step"]) == ("mixed_bfloat16", 6)
