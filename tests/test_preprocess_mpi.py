"""Preprocessing across MPI ranks (mpi4py): 2 ranks on this machine, through plain mpirun and through
launch/preprocess.sh, and 2 hosts of tests/netns.py writing into one output directory. Whatever the
ranks, the shards are byte-identical to one sequential process; a failing rank is reported once."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import time

import pytest

import netns
from conftest import ENV, PYTHON, REPO, last_line, run
from horovod_mlstm.preprocess import preprocess
from test_preprocess import OPTS, review_line, shards_and_manifest, tree, write_mixed_inputs

FLAGS = ["--num_shards=3", "--val_fraction=0.2", "--test_fraction=0.2", "--chunk_mb=0.02"]  # = OPTS, small chunks
MPIRUN = ["mpirun", "-np", "2", "--oversubscribe", *(["--allow-run-as-root"] if os.getuid() == 0 else [])]
two_hosts = netns.hosts_fixture(2)


@pytest.fixture(autouse=True)
def needs_mpirun():
    if not shutil.which("mpirun"):
        pytest.skip("mpirun is not on PATH (Open MPI; make setup installs it)")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_mixed_inputs(tmp_path_factory.mktemp("inputs"))


def sequential(inputs, out) -> tuple[dict, dict]:
    """The reference: one process, one worker, one chunk per file."""
    preprocess(inputs, str(out), 3, chunk_mb=64, **OPTS)
    return shards_and_manifest(out)


@pytest.mark.multiproc
@pytest.mark.parametrize("which", ["one_plain_file", "one_gzip_file", "several_files"])
def test_two_ranks_write_what_one_process_writes(tmp_path, inputs, which):
    chosen = {"one_plain_file": inputs[:1], "one_gzip_file": inputs[1:2], "several_files": inputs}[which]
    proc = run([*MPIRUN, PYTHON, "-m", "horovod_mlstm.preprocess", "--input", *chosen, f"--output_dir={tmp_path}/mpi",
                *FLAGS], check=True)
    assert shards_and_manifest(tmp_path / "mpi") == sequential(chosen, tmp_path / "seq")
    assert proc.stdout.count("[preprocess] ") == 1  # rank 0 reports, once


@pytest.mark.multiproc
def test_a_failing_rank_is_reported_once_and_nothing_is_published(tmp_path, inputs):
    out = tmp_path / "out"
    preprocess(inputs[:1], str(out), 3, **OPTS)
    before = tree(out)
    good = tmp_path / "good.json.gz"
    good.write_bytes(gzip.compress("".join(review_line(f"good {i} " + "x " * 50) for i in range(20000)).encode()))
    data = gzip.compress("".join(review_line(f"cut {i}") for i in range(20000)).encode())
    cut = tmp_path / "cut.json.gz"  # smaller, so rank 1 gets it (whole gzip files go largest first to rank 0)
    cut.write_bytes(data[: len(data) // 2])
    proc = run(["bash", "launch/preprocess.sh", "--np", "2", "--input", str(good), str(cut), f"--output_dir={out}",
                "--format=amazon_json", *FLAGS], timeout=300)
    assert proc.returncode != 0
    # one rank (rank 0) printed it; the launcher repeats rank 0's error line last, below mpirun's banner
    from_ranks = [line for line in proc.stderr.splitlines() if "<stderr>:error:" in line]
    assert len(from_ranks) == 1, proc.stderr[-3000:]
    assert from_ranks[0].startswith(f"[1,0]<stderr>:{last_line(proc.stderr)}")  # Open MPI tags the newline too
    assert last_line(proc.stderr).startswith(f"error: rank 1: {cut}:")
    assert "truncated or corrupt gzip" in last_line(proc.stderr)
    assert tree(out) == before and not list(out.glob(".staging-*"))


@pytest.mark.cli
def test_launcher_dry_run_uses_the_training_hostfiles(tmp_path):
    proc = run(["bash", "launch/preprocess.sh", "--hostfile", "hostfiles/dgx1-16nodes.txt", "--np", "16", "--dry-run",
                "--input", "in.json.gz", "--output_dir=/shared/out"], check=True)
    command = proc.stdout.strip()
    assert command.startswith(f"mpirun -np 16 -hostfile {REPO}/hostfiles/dgx1-16nodes.txt ")
    assert f"-x PYTHONPATH={REPO}" in command
    assert command.endswith("-m horovod_mlstm.preprocess --input in.json.gz --output_dir=/shared/out")
    proc = run(["bash", "launch/preprocess.sh", "--timeline", "t.json", "--input", "x"])
    assert proc.returncode == 2 and "do not apply to preprocess" in last_line(proc.stderr)


@pytest.mark.cluster
def test_two_hosts_write_one_output(tmp_path, two_hosts, inputs):
    out = tmp_path / "out"  # /tmp: the hosts' namespaces share the filesystem, like a cluster's shared storage
    job = netns.run_job(two_hosts, ["bash", "launch/preprocess.sh", "--hostfile", str(two_hosts.hostfile),
                                    "--iface", netns.IFACE, "--input", *inputs, f"--output_dir={out}", *FLAGS],
                        env=ENV, cwd=REPO, timeout=300, marker="horovod_mlstm.preprocess")
    assert job.proc.returncode == 0, job.proc.stdout[-3000:] + job.proc.stderr[-3000:]
    assert shards_and_manifest(out) == sequential(inputs, tmp_path / "seq")
    # rank 1 ran on host 2, started over ssh from host 1
    assert f"Accepted publickey for root from {two_hosts.addresses[0]}" in two_hosts.sshd_logs[1].read_text()


@pytest.mark.multiproc
def test_sigterm_to_the_launcher_stops_every_rank_and_publishes_nothing(tmp_path, inputs):
    out = tmp_path / "out"
    preprocess(inputs[:1], str(out), 3, **OPTS)
    before = tree(out)
    src = tmp_path / "many.json"
    src.write_text("".join(review_line(f"review {i} " + "text " * 50) for i in range(60000)))  # ~20 MB
    proc = subprocess.Popen(["bash", "launch/preprocess.sh", "--np", "2", "--input", str(src), f"--output_dir={out}",
                             "--chunk_mb=0.5", "--num_shards=3"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while len(list(out.glob(".staging-*/chunk-*"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # both ranks are working
    assert proc.poll() is None, "preprocess finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert last_line(stderr) == f"error: stopped by SIGUSR1; nothing was published, {out} keeps its previous output"
    assert "Traceback" not in stderr
    assert tree(out) == before and not list(out.glob(".staging-*"))
