"""N hosts for real on one machine, through the project's own launchers, with MPI and with Gloo.

Each host is a network namespace with its own address, hostname and sshd (tests/netns.py); the
job starts on host 1 and reaches the others over ssh, and the ranks allreduce across the bridge.
With N shards of one equal record each, N ranks x 1 stream see the bytes one process with N
streams sees, so the final weights must match such a run. An elastic job over all N hosts loses
one (a crash: link, address and processes gone), goes on with N-1 ranks, and grows back when the
host returns.

The suite runs N=4; `make cluster-test N=16` (CLUSTER_HOSTS=16) runs the same tests with 16 hosts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

import netns
from conftest import ENV, REPO, TINY_MODEL_FLAGS, assert_same_weights, python
from test_elastic import FLAGS as ELASTIC_FLAGS
from test_elastic import ElasticJob

pytestmark = pytest.mark.cluster


def cluster_hosts() -> int:
    value = os.environ.get("CLUSTER_HOSTS", "4")
    if not value.isdigit() or not 2 <= int(value) <= 254:
        raise pytest.UsageError(f"CLUSTER_HOSTS must be a number of hosts from 2 to 254, got {value!r}")
    return int(value)


HOSTS = cluster_hosts()
SEQ_LENGTH, STEPS = 32, 3
FLAGS = [*TINY_MODEL_FLAGS, f"--seq_length={SEQ_LENGTH}", f"--train_steps={STEPS}", "--warmup_steps=1",
         "--lr_horizon_steps=20", "--eval_windows=2"]
cluster = netns.hosts_fixture(HOSTS)


@pytest.fixture(scope="module")
def equal_shards(tmp_path_factory):
    return netns.write_equal_shards(tmp_path_factory.mktemp("equal_shards"), HOSTS, windows=8,
                                    seq_length=SEQ_LENGTH)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, equal_shards):
    """The reference: one process with HOSTS streams, the same global batch as HOSTS ranks x 1 stream."""
    model_dir = tmp_path_factory.mktemp("one_process")
    python("train.py", *FLAGS, f"--batch_size_per_worker={HOSTS}", f"--data_dir={equal_shards}",
           f"--model_dir={model_dir}", check=True)
    return model_dir


@pytest.mark.parametrize("script, controller", [("mpirun.sh", None), ("horovodrun.sh", "gloo")],
                         ids=["mpirun-mpi", "horovodrun-gloo"])
def test_n_hosts_train_like_one_process_with_n_streams(tmp_path, cluster, equal_shards, one_process,
                                                       script, controller):
    model_dir = tmp_path / "run"
    job = netns.run_job(cluster, ["bash", f"launch/{script}", "--hostfile", str(cluster.hostfile),
                                  "--np", str(HOSTS), "--iface", netns.IFACE, *([f"--{controller}"] if controller else []),
                                  *FLAGS, "--batch_size_per_worker=1", f"--data_dir={equal_shards}",
                                  f"--model_dir={model_dir}"],
                        env=ENV, cwd=REPO, timeout=120 + 45 * HOSTS)
    print(f"\n[cluster] {HOSTS} hosts, {script} ({controller or 'mpi'}): {job.describe()}")
    assert job.proc.returncode == 0, job.proc.stdout[-3000:] + job.proc.stderr[-3000:]
    # horovodrun's Gloo runner tags rank output "[0]<stdout>:", Open MPI's --tag-output "[1,0]<stdout>:".
    assert bool(re.search(r"^\[0\]<stdout>:", job.proc.stdout, re.M)) == (controller == "gloo")
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["world_size"] == HOSTS and summary["global_batch"] == HOSTS
    assert summary["final_step"] == STEPS and summary["replicas_in_sync"] is True
    # Every host but the first got its rank (or its Open MPI daemon) over ssh.
    for log in cluster.sshd_logs[1:]:
        assert f"Accepted publickey for root from {netns.SUBNET}." in log.read_text(), log
    reference = json.loads((one_process / "summary.json").read_text())
    assert summary["val_bpc"] == pytest.approx(reference["val_bpc"], rel=1e-5)
    assert_same_weights(one_process, model_dir)


def test_an_elastic_job_survives_losing_a_host_and_grows_back(tmp_path, cluster, tiny_data):
    """launch/elastic.sh on host 1 over a hosts file listing every host. Host N crashes mid-run and is unlisted
    (as a health check would); the job goes on with N-1 ranks; the host comes back (address, link, sshd) and is
    listed again; the job grows back to N. The global batch, N x (N-1) streams, divides over both worlds
    (240 = 16 x 15 = 15 x 16). SIGTERM then stops every rank at one step with equal weights, and a rerun with
    more steps continues from the checkpoint."""
    n = HOSTS
    listing = [f"{name}:1\n" for name in cluster.names]
    # The ranks notice the lost host when Gloo's timeout ends (a crashed host sends no reset), and the same
    # timeout bounds the wait for the returning host's new worker to start. elastic.sh's 120 s is for any
    # machine and cluster; 4 hosts here start a worker in about 20 s, so the suite waits 80 s, not 120.
    gloo_timeout = min(120, 40 + 10 * n)
    job = ElasticJob(tmp_path, tiny_data, steps=100_000, hosts="".join(listing), prefix=cluster.command(1, REPO),
                     args=["--iface", netns.IFACE, "--min-np", str(n - 1), f"--batch_size_per_worker={n - 1}",
                           "--log_every=1", "--commit_every=2", "--checkpoint_every=10"],
                     env={"HOROVOD_GLOO_TIMEOUT_SECONDS": str(gloo_timeout)})
    timeout = 300 + 30 * n
    try:
        at = job.wait_for("[train] step 5/", timeout=timeout)
        cluster.lose(n)
        lost = time.monotonic()
        job.hosts.write_text("".join(listing[:-1]))
        at = job.wait_for(f"[train] {n - 1} rank(s)", after=at, timeout=timeout)
        at = job.wait_for("[train] step ", after=at, timeout=timeout)
        recovery = time.monotonic() - lost
        for _ in range(2):  # and goes on there
            at = job.wait_for("[train] step ", after=at, timeout=timeout)
        logins_before = cluster.sshd_logs[n - 1].read_text().count("Accepted publickey")
        cluster.restore(n)
        back = time.monotonic()
        job.hosts.write_text("".join(listing))
        at = job.wait_for(f"[train] {n} rank(s)", after=at, timeout=timeout)
        at = job.wait_for("[train] step ", after=at, timeout=timeout)
        regrowth = time.monotonic() - back
        os.kill(job.proc.pid, signal.SIGTERM)
        status = job.proc.wait(timeout)
    finally:
        job.kill()
    log = job.log.read_text(errors="replace")
    assert status == 75, log[-3000:]
    summary = json.loads((job.model_dir / "summary.json").read_text())
    sizes, final = summary["steps_at_world_size"], summary["final_step"]
    print(f"\n[cluster] elastic, {n} hosts: lost host {n} after step 5, first step on {n - 1} ranks {recovery:.0f} s "
          f"later; host back, first step on {n} ranks {regrowth:.0f} s later; steps at each world size {sizes}")
    assert set(sizes) == {str(n), str(n - 1)} and sum(sizes.values()) == final, sizes
    assert summary["world_size"] == n and summary["global_batch"] == n * (n - 1)
    assert summary["replicas_in_sync"] is True and summary["stopped_early"], summary
    # The new worker on host n came in over ssh after the host was back.
    assert cluster.sshd_logs[n - 1].read_text().count("Accepted publickey") > logins_before
    rerun = python("train.py", *ELASTIC_FLAGS, f"--batch_size_per_worker={n * (n - 1)}", f"--train_steps={final + 2}",
                   f"--data_dir={tiny_data}", f"--model_dir={job.model_dir}", check=True, timeout=600)
    assert f"ckpt-{final} at step {final}" in rerun.stdout, rerun.stdout
    assert json.loads((job.model_dir / "summary.json").read_text())["final_step"] == final + 2


def test_hosts_have_their_own_names_and_are_removed_even_when_the_test_fails(tmp_path):
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="the test failed here"):
        with netns.hosts(2, tmp_path) as made:
            pids, namespaces = made.pids(), list(made.namespaces)
            seen = subprocess.run(made.command(1, tmp_path, "ssh", made.names[1], "hostname -i; hostname"),
                                  capture_output=True, text=True, timeout=60)
            assert seen.stdout.split() == [made.addresses[1], made.names[1]], seen.stderr
            assert made.hostfile.read_text() == f"{made.names[0]} slots=1\n{made.names[1]} slots=1\n"
            raise RuntimeError("the test failed here")
    assert pids and not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in namespaces if ns in left]
