"""Two hosts for real: the smallest cluster of tests/netns.py, launched the way a user would.

`launch/horovodrun.sh` with no controller chosen (horovodrun takes Open MPI) runs on host 1 and
starts rank 1 on host 2 over ssh; the ranks allreduce over the bridge between the namespaces.
tests/test_cluster.py covers N hosts with both controllers and checks the weights.
"""

from __future__ import annotations

import json

import pytest

import netns
from conftest import ENV, REPO, TINY_MODEL_FLAGS

pytestmark = pytest.mark.cluster

two_hosts = netns.hosts_fixture(2)


def test_horovodrun_across_two_hosts(tmp_path, two_hosts, tiny_data):
    model_dir = tmp_path / "run"
    job = netns.run_job(two_hosts, ["bash", "launch/horovodrun.sh", "--hostfile", str(two_hosts.hostfile),
                                    "--iface", netns.IFACE, *TINY_MODEL_FLAGS, "--train_steps=3", "--warmup_steps=1",
                                    f"--model_dir={model_dir}", f"--data_dir={tiny_data}"],
                        env=ENV, cwd=REPO, timeout=300)
    assert job.proc.returncode == 0, job.proc.stdout[-3000:] + job.proc.stderr[-3000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_step"] == 3 and summary["replicas_in_sync"]
    # Rank 1 was started on host 2 over ssh from host 1's address.
    assert f"Accepted publickey for root from {two_hosts.addresses[0]}" in two_hosts.sshd_logs[1].read_text()
