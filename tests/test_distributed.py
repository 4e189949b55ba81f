"""Real multi-process Horovod runs (horovodrun -np 2 on localhost), no mocks.

Data: two shards per split holding one equal-length record each, so a 2-rank job and a
1-rank job on the concatenated batch see the same streams and must make the same updates.
"""

from __future__ import annotations

import json
import os
import random
import re

import numpy as np
import pytest
import tensorflow as tf

from conftest import (HOROVODRUN, PYTHON, TINY_MODEL_FLAGS, assert_same_weights, horovodrun, python, run,
                      write_shards)
from horovod_mlstm import corpus, distributed as dist

FLAGS = [*TINY_MODEL_FLAGS, "--batch_scaling=none", "--checkpoint_every=2", "--warmup_steps=1",
         "--lr_horizon_steps=20", "--eval_windows=2"]


@pytest.fixture(scope="module")
def two_record_data(tmp_path_factory):
    text = " ".join(corpus.texts(400, seed=7)).encode()
    half = 4 * 32 * 40  # 4 streams x 40 windows of 32 bytes, an exact multiple

    def record(split, i):
        start = random.Random(f"{split}{i}").randrange(0, len(text) - half)
        return [text[start:start + half]]

    return write_shards(tmp_path_factory.mktemp("two_records"),
                        {split: [record(split, i) for i in range(2)] for split in ("train", "val")})


@pytest.mark.multiproc
def test_two_ranks_match_one_rank_on_the_concatenated_batch_and_resume(tmp_path, two_record_data):
    data = f"--data_dir={two_record_data}"
    one = tmp_path / "one_rank"
    python("train.py", *FLAGS, f"--model_dir={one}", data, "--batch_size_per_worker=4", "--train_steps=4",
           check=True)

    two = tmp_path / "two_ranks"
    proc = horovodrun(2, "train.py", *FLAGS, f"--model_dir={two}", data, "--batch_size_per_worker=2",
                      "--train_steps=2", check=True, timeout=300)
    assert "2 rank(s)" in proc.stdout
    # ... stopped at step 2, then resumed by a new 2-rank job: RNN states come back per rank.
    proc = horovodrun(2, "train.py", *FLAGS, f"--model_dir={two}", data, "--batch_size_per_worker=2",
                      "--train_steps=4", check=True, timeout=300)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout

    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_step"] == 4 and summary["global_batch"] == 4
    assert summary["replicas_in_sync"] is True  # both ranks hold bit-identical weights
    one_summary = json.loads((one / "summary.json").read_text())
    assert summary["val_bpc"] == pytest.approx(one_summary["val_bpc"], rel=1e-5)
    assert_same_weights(one, two)


@pytest.mark.multiproc
def test_accumulated_micro_batches_match_one_big_batch_across_ranks(tmp_path, two_record_data):
    """2 ranks x 2 micro-batches of 1 stream == 1 rank with 4 streams in one pass."""
    data = f"--data_dir={two_record_data}"
    one = tmp_path / "one"
    python("train.py", *FLAGS, f"--model_dir={one}", data, "--batch_size_per_worker=4", "--train_steps=2",
           check=True)
    acc = tmp_path / "accumulated"
    horovodrun(2, "train.py", *FLAGS, f"--model_dir={acc}", data, "--batch_size_per_worker=1",
               "--backward_passes_per_step=2", "--train_steps=2", check=True, timeout=300)
    assert_same_weights(one, acc)


@pytest.mark.unit
def test_cycle_time_is_set_before_horovod_starts(monkeypatch):
    """--cycle_time_ms must be in the environment when hvd.init() reads it, whatever the launcher set;
    0 leaves the launcher's value. (The benchmark, horovod_mlstm/bench, measures what the setting is worth, in real jobs.)"""
    seen = []
    monkeypatch.setattr(dist.hvd, "init", lambda: seen.append(os.environ.get("HOROVOD_CYCLE_TIME")))
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "1")
    dist.init(cycle_time_ms=20.0)
    dist.init(cycle_time_ms=0.0)
    assert seen == ["20", "20"]
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "1")
    dist.init(cycle_time_ms=0.0)
    assert seen[-1] == "1"


@pytest.mark.multiproc
def test_a_checkpoint_continues_on_another_number_of_ranks(tmp_path, tiny_data):
    """4 ranks x 8 streams, then 2 x 16, then 1 x 32: the same streams, bytes and RNN states as one
    uninterrupted 1 x 32 run, so the same final weights."""
    flags = [*FLAGS, f"--data_dir={tiny_data}", "--checkpoint_every=100"]
    python("train.py", *flags, f"--model_dir={tmp_path}/straight", "--batch_size_per_worker=32", "--train_steps=6",
           check=True)
    staged = f"--model_dir={tmp_path}/staged"
    horovodrun(4, "train.py", *flags, staged, "--batch_size_per_worker=8", "--train_steps=2", check=True, timeout=600)
    proc = horovodrun(2, "train.py", *flags, staged, "--batch_size_per_worker=16", "--train_steps=4", check=True,
                      timeout=600)
    assert "2 rank(s) x 16 streams" in proc.stdout and "at step 2" in proc.stdout
    proc = python("train.py", *flags, staged, "--batch_size_per_worker=32", "--train_steps=6", check=True)
    assert "1 rank(s) x 32 streams" in proc.stdout and "at step 4" in proc.stdout
    assert_same_weights(tmp_path / "straight", tmp_path / "staged")
    # Another global batch cannot continue it: its streams would be other bytes.
    proc = python("train.py", *flags, staged, "--batch_size_per_worker=16", "--train_steps=8")
    assert proc.returncode != 0 and "carries 32 streams but this job has 16" in proc.stderr.strip().splitlines()[-1]


def horovodrun_with(controller: str, np: int, *args: str, **kw):
    """horovodrun with an explicit controller (--mpi or --gloo), not the one horovodrun picks."""
    return run([HOROVODRUN, controller, "-np", str(np), "-H", f"localhost:{np}", PYTHON, *args], **kw)


ADASUM_PROBE = """
import json
import sys
import tensorflow as tf
from horovod_mlstm import distributed as dist
dist.init(gradient_reduction="adasum")
a = [[3.0, 0.0], [1.0, 2.0], [4.0]]   # rank 0's gradients (three tensors)
b = [[0.0, 4.0], [2.0, 4.0], [4.0]]   # rank 1's: orthogonal, parallel, equal to rank 0's
mine = a if dist.rank() == 0 else b
out = tf.function(dist.allreduce_gradients)([tf.constant(g) for g in mine])
sys.stdout.write("RESULT " + json.dumps([o.numpy().tolist() for o in out]) + "\\n")  # one write: one line
sys.stdout.flush()
"""


def adasum_result(stdout: str, ranks: int) -> list:
    stdout = re.sub(r"\[\d+,\d+\]<stdout>:", "", stdout)  # mpirun's tags, which it also puts inside lines
    results = [line.split("RESULT ", 1)[1] for line in stdout.splitlines() if "RESULT " in line]
    assert len(results) == ranks and len(set(results)) == 1, stdout  # every rank holds the same combination
    return json.loads(results[0])


@pytest.mark.multiproc
def test_adasum_combines_gradients_tensor_by_tensor_without_dividing_by_ranks():
    """Adasum(a, b) = (1 - a.b / 2|a|^2) a + (1 - a.b / 2|b|^2) b, per tensor: orthogonal gradients add
    up (an average would halve them), parallel ones average, equal ones stay. One rank: its own."""
    proc = horovodrun_with("--mpi", 2, "-c", ADASUM_PROBE, check=True, timeout=300)
    out = adasum_result(proc.stdout, ranks=2)
    np.testing.assert_allclose(out[0], [3.0, 4.0])   # orthogonal: the sum
    np.testing.assert_allclose(out[1], [1.5, 3.0])   # parallel (b = 2a): 0.75 b = 1.5 a
    np.testing.assert_allclose(out[2], [4.0])        # equal: unchanged
    single = python("-c", ADASUM_PROBE, check=True, timeout=120)
    assert adasum_result(single.stdout, ranks=1) == [[3.0, 0.0], [1.0, 2.0], [4.0]]


@pytest.mark.multiproc
def test_adasum_under_gloo_is_one_line_from_every_rank(tmp_path, two_record_data):
    """Gloo has no Adasum (its op fails with "No Adasum operation enabled"): refused at start-up."""
    proc = horovodrun_with("--gloo", 2, "train.py", *FLAGS, f"--model_dir={tmp_path}/gloo",
                           f"--data_dir={two_record_data}", "--batch_size_per_worker=2", "--train_steps=2",
                           "--gradient_reduction=adasum", timeout=300)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "error: Adasum gradient reduction needs Horovod's MPI" in line]
    assert len(errors) == 2 and all("horovodrun --mpi" in line for line in errors), output[-3000:]
    assert "]<stderr>:Traceback" not in output and "No Adasum operation enabled" not in output
    assert not (tmp_path / "gloo" / "checkpoints").exists()


@pytest.mark.multiproc
def test_ranks_started_with_different_flags_stop_with_one_line_before_training(tmp_path, two_record_data):
    """Different --train_steps would hang the longer rank in a collective; a different --learning_rate would
    drift silently. The ranks compare their settings first."""
    flags = " ".join([*FLAGS, f"--model_dir={tmp_path}/run", f"--data_dir={two_record_data}", "--batch_size_per_worker=2"])
    per_rank = '$([ "$HOROVOD_RANK" = 1 ] && echo "--learning_rate=2e-3 --train_steps=3" || echo --train_steps=4)'
    proc = run([HOROVODRUN, "--gloo", "-np", "2", "-H", "localhost:2", "bash", "-c",
                f"exec {PYTHON} train.py {flags} {per_rank}"], timeout=300)
    assert proc.returncode != 0
    errors = {line.split(">:", 1)[-1] for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line}
    assert errors == {"error: the ranks were started with different settings: --learning_rate is 0.003 on rank 0, "
                      "0.002 on rank 1; --train_steps is 4 on rank 0, 3 on rank 1"}, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.unit
def test_ranks_with_different_settings_are_one_line_naming_them(monkeypatch):
    ranks = [{"train_steps": 100, "learning_rate": 1e-3, "seed": 0},
             {"train_steps": 50, "learning_rate": 2e-3, "seed": 0}]
    monkeypatch.setattr(dist.hvd, "size", lambda: 2)
    monkeypatch.setattr(dist.hvd, "allgather_object", lambda value: ranks)
    with pytest.raises(ValueError) as error:
        dist.agree_on(ranks[0])
    assert str(error.value) == ("the ranks were started with different settings: --train_steps is 100 on rank 0, 50 "
                                "on rank 1; --learning_rate is 0.001 on rank 0, 0.002 on rank 1")
    monkeypatch.setattr(dist.hvd, "allgather_object", lambda value: [ranks[0], ranks[0]])
    dist.agree_on(ranks[0])


@pytest.mark.unit
def test_replicas_are_identical_only_byte_for_byte(monkeypatch):
    import hashlib

    variables = [tf.Variable(np.linspace(0, 1, 50, dtype=np.float32)), tf.Variable(np.ones([3, 4], np.float32))]
    mine = hashlib.sha256(b"".join(v.numpy().tobytes() for v in variables)).hexdigest()
    one_ulp = variables[0].numpy().copy()
    one_ulp[7] = np.nextafter(one_ulp[7], np.float32(2))
    other = hashlib.sha256(one_ulp.tobytes() + variables[1].numpy().tobytes()).hexdigest()
    monkeypatch.setattr(dist.hvd, "size", lambda: 2)
    monkeypatch.setattr(dist.hvd, "allgather_object", lambda digest: [digest, mine])
    assert dist.replicas_identical(variables)
    monkeypatch.setattr(dist.hvd, "allgather_object", lambda digest: [digest, other])
    assert not dist.replicas_identical(variables)

