"""Elastic training survives a lost worker and a signal to its launcher (real processes).

The two "hosts" are this machine under two names (localhost and 127.0.0.1): Horovod launches
both locally, but treats them as separate hosts, so losing one does not blacklist the other.
A host that leaves and comes back is tested on sixteen network-namespace hosts, where it is a
real host going away (tests/test_cluster.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import tensorflow as tf

from conftest import ENV, REPO, TINY_MODEL_FLAGS, assert_same_weights, python, run

FLAGS = [*TINY_MODEL_FLAGS, "--learning_rate=3e-3", "--batch_scaling=none", "--warmup_steps=2", "--lr_decay=constant",
         "--log_every=10", "--checkpoint_every=100", "--commit_every=10", "--eval_windows=2"]
BOTH_HOSTS = "localhost:1\n127.0.0.1:1\n"


class ElasticJob:
    """`launch/elastic.sh` over a hosts file the test edits, with its log in a file. `prefix` runs the launcher
    elsewhere (on a namespace host: tests/test_cluster.py); `args` come last and win (absl and the launcher take
    an option's last value); `env` adds to the launcher's environment."""

    def __init__(self, tmp: Path, data: Path, steps: int, hosts: str = BOTH_HOSTS, prefix=(), args=(), env=None):
        self.hosts = tmp / "hosts.txt"  # read by hostfiles/discover_hosts.sh
        self.hosts.write_text(hosts)
        self.model_dir = tmp / "elastic"
        self.log = tmp / "log.txt"
        cmd = [*prefix, "bash", "launch/elastic.sh", "--min-np", "1", *FLAGS, f"--model_dir={self.model_dir}",
               f"--data_dir={data}", f"--train_steps={steps}", *args]
        env = {**ENV, "HOROVOD_MLSTM_ELASTIC_HOSTS": str(self.hosts), **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, text: str, timeout: float = 240, after: int = 0) -> int:
        """Waits until `text` appears in the log past offset `after`; returns where it ends."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            log = self.log.read_text(errors="replace")
            at = log.find(text, after)
            if at >= 0:
                return at + len(text)
            if self.proc.poll() is not None:
                pytest.fail(f"job ended ({self.proc.returncode}) before {text!r}:\n{log[-3000:]}")
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {text!r}:\n{self.log.read_text(errors='replace')[-3000:]}")

    def finish(self, timeout: float = 300) -> dict:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"elastic job did not finish:\n{self.log.read_text(errors='replace')[-3000:]}")
        assert rc == 0, self.log.read_text(errors="replace")[-3000:]
        return json.loads((self.model_dir / "summary.json").read_text())

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


def worker_pids(rank: int) -> list[int]:
    """Training processes started with HOROVOD_RANK=rank."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"train.py\0--elastic" in cmdline and f"HOROVOD_RANK={rank}".encode() in environ:
            found.append(int(pid))
    return found


@pytest.fixture
def job(tmp_path, tiny_data):
    jobs = []

    def start(steps):
        jobs.append(ElasticJob(tmp_path, tiny_data, steps))
        return jobs[-1]

    yield start
    for j in jobs:
        j.kill()


@pytest.mark.multiproc
def test_sigkill_of_a_worker_loses_no_step(job, tmp_path, tiny_data):
    steps = 200
    j = job(steps)
    j.wait_for("step 60/")
    victims = worker_pids(1)
    assert victims, "no rank-1 worker found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    after = j.wait_for("1 rank(s)")
    j.wait_for(f"step {steps}/{steps}", after=after)
    summary = j.finish()
    assert summary["final_step"] == steps
    sizes = summary["steps_at_world_size"]
    assert set(sizes) == {"1", "2"} and sum(sizes.values()) == steps, sizes
    assert summary["chars_seen"] == steps * summary["global_batch"] * 32
    # rank 0 of whatever world is current keeps writing checkpoints
    assert tf.train.latest_checkpoint(str(j.model_dir / "checkpoints")).endswith(f"ckpt-{steps}")
    # Same global batch, same streams: the run equals one that never lost a worker.
    straight = tmp_path / "straight"
    python("train.py", *FLAGS, f"--model_dir={straight}", f"--data_dir={tiny_data}",
           "--batch_size_per_worker=8", f"--train_steps={steps}", check=True)
    assert_same_weights(straight, j.model_dir, rtol=1e-3, atol=1e-4)


@pytest.mark.multiproc
def test_sigterm_to_the_launcher_stops_at_a_checkpoint_and_the_same_command_continues(job):
    """The launcher signals the ranks itself, not horovodrun, which would kill them 5 s later and can then
    report them as status 0 (launch/common.sh): every rank stops at one step and the job exits 75."""
    j = job(2000)
    j.wait_for("step 30/")
    os.kill(j.proc.pid, signal.SIGTERM)
    assert j.proc.wait(120) == 75, j.log.read_text(errors="replace")[-3000:]
    log = j.log.read_text(errors="replace")
    assert "passing SIGTERM to the ranks on this host" in log
    stopped = re.findall(r"\[train\] stopped at step (\d+) \(SIGTERM\)", log)
    assert stopped, log[-3000:]
    step = int(stopped[0])
    assert tf.train.latest_checkpoint(str(j.model_dir / "checkpoints")).endswith(f"ckpt-{step}")
    rerun = job(step + 10)
    rerun.wait_for(f"continuing at step {step}")
    assert rerun.finish()["final_step"] == step + 10


@pytest.mark.cli
def test_launcher_dry_run_and_bad_settings(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# two slots\nnode1:2\nnode2:2\n")
    env = {"HOROVOD_MLSTM_ELASTIC_HOSTS": str(hosts)}
    proc = run(["bash", "launch/elastic.sh", "--min-np", "2", "--dry-run", "--train_steps=5"], env=env, check=True)
    assert "-np 4 --min-np 2 --max-np 4 --host-discovery-script" in proc.stdout
    assert "train.py --elastic --train_steps=5" in proc.stdout and "--network-interface" not in proc.stdout
    bad = run(["bash", "launch/elastic.sh", "--np", "5", "--dry-run"], env=env)
    assert bad.returncode != 0 and "more than the 4 slots" in bad.stderr
    hosts.write_text("node1 two\n")
    bad = run(["bash", "launch/elastic.sh", "--dry-run"], env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert f"discover_hosts.sh: {hosts}:1: expected 'host slots=N' or 'host:N', got 'node1 two'" in bad.stderr
    for args, message in [(["--min-np"], "--min-np needs a value"), (["--min-np", "0"], "--min-np must be a positive"),
                          (["--max-np=x"], "--max-np must be a positive")]:
        bad = run(["bash", "launch/elastic.sh", "--dry-run", *args], env=env)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr, bad.stderr


@pytest.mark.cli
def test_launcher_hostfile_is_the_discovery_hosts_file(tmp_path):
    """--hostfile (Open MPI "host slots=N" or discovery "host:slots" lines) is what discovery reads, not ignored."""
    (tmp_path / "cluster.txt").write_text("# three hosts\nnode1 slots=4\nnode2:4\nnode3 slots=8  # big one\n")
    proc = run(["bash", f"{REPO}/launch/elastic.sh", "--hostfile", "cluster.txt", "--dry-run"], cwd=tmp_path,
               env={"HOROVOD_MLSTM_ELASTIC_HOSTS": "/nonexistent"}, check=True)
    assert proc.stdout.startswith(f"env HOROVOD_MLSTM_ELASTIC_HOSTS={tmp_path}/cluster.txt ")
    assert "-np 16 --min-np 1 --max-np 16 --host-discovery-script" in proc.stdout
    discovered = run([f"{REPO}/hostfiles/discover_hosts.sh"],
                     env={"HOROVOD_MLSTM_ELASTIC_HOSTS": str(tmp_path / "cluster.txt")})
    assert discovered.stdout.split() == ["node1:4", "node2:4", "node3:8"]
    for args, message in [(["--hostfile", "missing.txt"], "missing.txt does not exist"),
                          (["--hostfile", "cluster.txt", "--discovery", "x.sh"], "exclude each other")]:
        bad = run(["bash", f"{REPO}/launch/elastic.sh", "--dry-run", *args], cwd=tmp_path)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr, bad.stderr
