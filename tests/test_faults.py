"""Fault injection: kills at chosen syscalls, read-only directories, a full disk, lost index files,
diverging runs and reruns. Whatever happens, data that was good stays good and nothing false is
reported. Probes that need a facility this machine lacks skip and name it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest
import tensorflow as tf

from conftest import ENV, PYTHON, REPO, TINY_MODEL_FLAGS, last_line, python, run
from horovod_mlstm.records import split_shards

PREPROCESS = [PYTHON, "-m", "horovod_mlstm.preprocess"]


def reviews(path, tag, n=60):
    path.write_text("".join(json.dumps({"summary": tag, "reviewText": f"{tag} review {i}"}) + "\n" for i in range(n)))
    return str(path)


def published(data_dir) -> set[bytes]:
    """Every record of a data dir, read through its manifest (which checks every shard's size)."""
    return {r.numpy() for split in ("train", "val", "test") for s in split_shards(str(data_dir), split)
            for r in tf.data.TFRecordDataset([s.path])}


def needs(tool):
    if not shutil.which(tool):
        pytest.skip(f"{tool} is not installed (make setup installs it)")


# ---------------------------------------------------------------- preprocess publishing

# A run with --num_shards=3 renames 12 times: 9 shards into place within staging, the staged manifest,
# staging -> shards-<run>, and the switch of manifest.json. Killed at one of each kind.
@pytest.mark.multiproc
@pytest.mark.parametrize("rename", [1, 10, 11, 12], ids=["a_shard", "staged_manifest", "shards_dir", "switch"])
def test_preprocess_killed_at_each_rename_leaves_the_old_output_whole(tmp_path, rename):
    needs("strace")
    out = tmp_path / "out"
    run([*PREPROCESS, "--input", reviews(tmp_path / "old.json", "old"), f"--output_dir={out}", "--num_shards=2"],
        check=True)
    old = published(out)
    killed = run(["strace", "-f", "-o", "/dev/null", "-e", "trace=rename",
                  "-e", f"inject=rename:signal=SIGKILL:when={rename}",
                  *PREPROCESS, "--input", reviews(tmp_path / "new.json", "new"), f"--output_dir={out}", "--num_shards=3"])
    assert killed.returncode != 0
    assert published(out) == old  # complete and unchanged
    # The next run publishes and removes what the killed one left (its staging dir or its shards).
    run([*PREPROCESS, "--input", str(tmp_path / "new.json"), f"--output_dir={out}", "--num_shards=3"], check=True)
    assert published(out) != old
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [json.loads(
        (out / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"].split("/")[0]]


@pytest.mark.multiproc
def test_two_preprocess_runs_into_one_dir_leave_one_runs_output(tmp_path):
    needs("strace")
    out = tmp_path / "out"
    slow = subprocess.Popen(["strace", "-f", "-o", "/dev/null", "-e", "trace=rename",
                             "-e", "inject=rename:delay_enter=300000",  # 0.3 s before each rename
                             *PREPROCESS, "--input", reviews(tmp_path / "a.json", "alpha"), f"--output_dir={out}"],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fast = run([*PREPROCESS, "--input", reviews(tmp_path / "b.json", "beta"), f"--output_dir={out}"])
    assert slow.wait(120) == 0 and fast.returncode == 0
    records = published(out)
    assert {r.split(b".")[0] for r in records} in ({b"alpha"}, {b"beta"}) and len(records) == 60


# ---------------------------------------------------------------- read-only and full filesystems

def without_root_override(*cmd):
    """cmd run by root with CAP_DAC_OVERRIDE dropped, so file permissions apply to it."""
    needs("capsh")
    probe = subprocess.run(["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot drop capabilities here: {probe.stderr.strip()}")
    return ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", " ".join(map(str, cmd))]


@pytest.mark.cli
@pytest.mark.needs_root
def test_read_only_directories_are_one_line(tmp_path, tiny_data):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    proc = run(without_root_override(*PREPROCESS, "--input", reviews(tmp_path / "r.json", "r"),
                                     f"--output_dir={locked}/out"))
    assert proc.returncode != 0 and last_line(proc.stderr).startswith("error: cannot create output directory")
    proc = run(without_root_override(PYTHON, "train.py", f"--model_dir={locked}/model", f"--data_dir={tiny_data}",
                                     "--train_steps=5", *TINY_MODEL_FLAGS))
    assert proc.returncode != 0 and last_line(proc.stderr).startswith("error: cannot create --model_dir")
    assert "Traceback" not in proc.stderr


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.cli
@pytest.mark.needs_root
def test_a_full_disk_stops_training_with_one_line_and_keeps_the_checkpoints(small_disk, tiny_data):
    model_dir = small_disk / "run"
    proc = python("train.py", f"--model_dir={model_dir}", f"--data_dir={tiny_data}", "--train_steps=200",
                  "--checkpoint_every=1", "--keep_checkpoints=1000", *TINY_MODEL_FLAGS, "--hidden_size=48")
    assert proc.returncode != 0
    assert "No space left on device" in last_line(proc.stderr) and last_line(proc.stderr).startswith("error:")
    assert "Traceback" not in proc.stderr
    ckpts = model_dir / "checkpoints"
    assert not list(ckpts.glob("*_temp*"))
    latest = tf.train.latest_checkpoint(str(ckpts))
    assert latest and tf.train.load_checkpoint(latest).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") > 1


# ---------------------------------------------------------------- checkpoints and summaries

def train(model_dir, data, *extra, **kw):
    return python("train.py", f"--model_dir={model_dir}", f"--data_dir={data}", "--checkpoint_every=10",
                  *TINY_MODEL_FLAGS, *extra, **kw)


@pytest.mark.cli
def test_lost_checkpoint_index_resumes_from_the_files(tmp_path, tiny_data):
    model_dir = tmp_path / "run"
    train(model_dir, tiny_data, "--train_steps=20", check=True)
    (model_dir / "checkpoints" / "checkpoint").unlink()
    proc = train(model_dir, tiny_data, "--train_steps=30", check=True)
    assert "index) is missing; found ckpt-10, ckpt-20" in proc.stderr and "at step 20" in proc.stdout
    assert json.loads((model_dir / "summary.json").read_text())["final_step"] == 30


@pytest.mark.cli
def test_divergence_stops_the_job_and_keeps_the_good_checkpoints(tmp_path, tiny_data):
    model_dir = tmp_path / "run"
    train(model_dir, tiny_data, "--train_steps=20", check=True)
    proc = train(model_dir, tiny_data, "--train_steps=60", "--learning_rate=1e6", "--max_learning_rate=0",
                 "--clip_norm=0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr).startswith("error: training diverged at step ")
    assert "ckpt-20" in last_line(proc.stderr)
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-20")
    assert json.loads((model_dir / "summary.json").read_text())["final_step"] == 20


@pytest.mark.cli
def test_rerunning_a_finished_job_changes_nothing(tmp_path, tiny_data):
    model_dir = tmp_path / "run"
    train(model_dir, tiny_data, "--train_steps=20", check=True)
    before = (model_dir / "summary.json").read_text()
    for steps in (20, 10):
        proc = train(model_dir, tiny_data, f"--train_steps={steps}", check=True)
        assert "is already at step 20" in proc.stdout and "nothing to train" in proc.stdout
        assert (model_dir / "summary.json").read_text() == before
    summary = json.loads(before)  # strict JSON: json.loads would accept NaN, so check the text
    assert "NaN" not in before and summary["final_step"] == 20 and summary["steps_this_run"] == 20


@pytest.mark.cli
def test_resumed_summary_keeps_the_earlier_history(tmp_path, tiny_data):
    model_dir = tmp_path / "run"
    train(model_dir, tiny_data, "--train_steps=20", "--eval_every=10", check=True)
    train(model_dir, tiny_data, "--train_steps=30", "--eval_every=10", check=True)
    summary = json.loads((model_dir / "summary.json").read_text())
    assert [h["step"] for h in summary["history"]] == [10, 20, 30] and summary["steps_this_run"] == 10


@pytest.mark.cli
def test_a_data_dir_without_manifest_is_refused(tmp_path, tiny_data):
    """What a killed publish of the old preprocess left: shards, no manifest. Training must not use it."""
    data = tmp_path / "partial"
    shutil.copytree(tiny_data, data)
    (data / "manifest.json").unlink()
    proc = train(tmp_path / "run", data, "--train_steps=5")
    assert proc.returncode != 0 and "holds shards but no manifest" in last_line(proc.stderr)
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.cli
def test_a_truncated_shard_is_refused(tmp_path, tiny_data):
    data = tmp_path / "cut"
    shutil.copytree(tiny_data, data)
    shard = split_shards(str(data), "val")[1].path
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    proc = train(tmp_path / "run", data, "--train_steps=5")
    assert proc.returncode != 0 and "where manifest.json says" in last_line(proc.stderr)
    assert os.path.basename(shard) in last_line(proc.stderr)


@pytest.mark.multiproc
def test_one_line_from_every_rank_under_horovodrun(tmp_path, tiny_data):
    """A data error is found by every rank before any collective: no Gloo tracebacks, same line."""
    data = tmp_path / "partial"
    shutil.copytree(tiny_data, data)
    (data / "manifest.json").unlink()
    tag = uuid.uuid4().hex[:6]
    proc = run([str(REPO / ".venv/bin/horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2", PYTHON, "train.py",
                f"--model_dir={tmp_path}/run{tag}", f"--data_dir={data}", "--train_steps=5", *TINY_MODEL_FLAGS],
               timeout=300)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error: no manifest.json" in line]
    assert len(errors) == 2 and "]<stderr>:Traceback" not in proc.stdout + proc.stderr  # none from the ranks
