"""Two hosts for real: two network namespaces with their own addresses and sshd, one rank each.

horovodrun runs inside host A and starts rank 1 on host B over ssh, and the ranks allreduce
over the veth link between the namespaces, so the multi-node path (ssh launch, MPI across
addresses) runs, not only localhost. Open MPI carries the collectives here: Gloo's TCP pairs
resolve the shared hostname of the two namespaces to 127.0.0.1 and fail to connect.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid

import pytest

from conftest import ENV, HOROVODRUN, PYTHON, REPO, TINY_MODEL_FLAGS

ADDRESSES = {"A": "10.200.0.1", "B": "10.200.0.2"}


def sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


@pytest.fixture
def two_hosts(tmp_path):
    if not shutil.which("ip") or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("needs iproute2 and openssh-server (make setup installs both)")
    tag = uuid.uuid4().hex[:6]
    ns = {h: f"hm{h}{tag}" for h in ADDRESSES}
    probe = sh("ip", "netns", "add", ns["A"], check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {probe.stderr.strip()}")
    pids = []
    try:
        sh("ip", "netns", "add", ns["B"])
        sh("ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        for h, veth in (("A", f"va{tag}"), ("B", f"vb{tag}")):
            sh("ip", "link", "set", veth, "netns", ns[h])
            sh("ip", "netns", "exec", ns[h], "ip", "link", "set", veth, "name", "hm0")
            sh("ip", "netns", "exec", ns[h], "ip", "addr", "add", f"{ADDRESSES[h]}/24", "dev", "hm0")
            sh("ip", "netns", "exec", ns[h], "ip", "link", "set", "hm0", "up")
            sh("ip", "netns", "exec", ns[h], "ip", "link", "set", "lo", "up")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id"))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "hostkey"))
        shutil.copy(tmp_path / "id.pub", tmp_path / "authorized_keys")
        os.makedirs("/run/sshd", exist_ok=True)
        for h, address in ADDRESSES.items():
            (tmp_path / f"sshd_{h}.conf").write_text(
                f"Port 22\nListenAddress {address}\nHostKey {tmp_path}/hostkey\nPermitRootLogin prohibit-password\n"
                f"AuthorizedKeysFile {tmp_path}/authorized_keys\nPidFile {tmp_path}/sshd_{h}.pid\n"
                "StrictModes no\nUsePAM no\nPasswordAuthentication no\nLogLevel INFO\n")
            sh("ip", "netns", "exec", ns[h], "/usr/sbin/sshd", "-f", str(tmp_path / f"sshd_{h}.conf"),
               "-E", str(tmp_path / f"sshd_{h}.log"))
        for h in ADDRESSES:  # sshd writes its pid file just after it daemonises
            pid_file = tmp_path / f"sshd_{h}.pid"
            for _ in range(100):
                if pid_file.exists() and pid_file.read_text().strip():
                    break
                time.sleep(0.05)
            pids.append(int(pid_file.read_text()))
        yield {"ns": ns, "key": tmp_path / "id", "logs": {h: tmp_path / f"sshd_{h}.log" for h in ADDRESSES}}
    finally:
        for pid in pids:
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        sh("pkill", "-f", f"sshd -f {tmp_path}/sshd_", check=False)  # any whose pid file never appeared
        for name in ns.values():
            sh("ip", "netns", "del", name, check=False)  # takes its end of the veth pair with it
        sh("ssh-keygen", "-R", ADDRESSES["B"], check=False)  # horovodrun's ssh adds B to known_hosts


def test_horovodrun_across_two_hosts(tmp_path, two_hosts, tiny_data):
    model_dir = tmp_path / "run"
    cmd = ["ip", "netns", "exec", two_hosts["ns"]["A"], HOROVODRUN, "--mpi", "-np", "2",
           "-H", f"{ADDRESSES['A']}:1,{ADDRESSES['B']}:1", "--ssh-identity-file", str(two_hosts["key"]),
           "--network-interface", "hm0", "--mpi-args=--mca oob_tcp_if_include hm0",
           PYTHON, "train.py", *TINY_MODEL_FLAGS, "--train_steps=3", "--warmup_steps=1",
           f"--model_dir={model_dir}", f"--data_dir={tiny_data}"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_step"] == 3 and summary["replicas_in_sync"]
    # Rank 1 was started on host B over ssh from host A's address.
    assert f"Accepted publickey for root from {ADDRESSES['A']}" in two_hosts["logs"]["B"].read_text()
