"""N hosts on one machine: network namespaces on one bridge, each with its own name, address and sshd.

A real cluster differs from localhost in three ways that matter to the launchers: every rank but
the first is started over ssh, every host has its own address, and every host has its own
hostname. `hosts(n, workdir)` builds exactly that:

- a hub namespace holding a Linux bridge, and n host namespaces each joined to it by a veth pair
  whose host end is `hm0` with address 10.201.0.k/24 (k = 1..n);
- per host a UTS and mount namespace: hostname `<prefix>-k`, an /etc/hosts naming every host, and
  an /etc/ssh/ssh_config that uses the cluster's key, trusts the throwaway host key, writes no
  known_hosts and gives up on a server silent for 10 s; both are bind mounts visible only inside
  that host, so root's ~/.ssh and the real /etc are never touched;
- per host an sshd started inside those namespaces, so whatever arrives over ssh (orted, a
  horovodrun worker) runs under that host's name, address and files;
- an Open MPI hostfile, `<hostname> slots=1` per host.

Everything (every process in the namespaces, the namespaces, and with the hub the bridge) is
removed on exit, also when the test failed. Run commands on host k with `cluster.command(k, cwd, ...)`;
`cluster.lose(k)` takes host k down as a crashed node and `cluster.restore(k)` brings it back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

SUBNET = "10.201.0"
IFACE = "hm0"
TOOLS = ("ip", "nsenter", "unshare", "ssh", "ssh-keygen", "/usr/sbin/sshd")

# Inside fresh UTS + mount namespaces: the host's /etc/hosts and ssh_config, its hostname, then sshd.
_ENTER_HOST = ('mount --bind "$1/hosts" /etc/hosts && mount --bind "$1/ssh_config" /etc/ssh/ssh_config'
               ' && hostname "$2" && shift 2 && exec "$@"')


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why N hosts cannot be built here (a missing tool, or no right to make namespaces), else None."""
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        return f"needs {', '.join(missing)} (iproute2, util-linux, openssh; make setup installs them)"
    probe = f"hmprobe{uuid.uuid4().hex[:6]}"
    made = _sh("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create network namespaces here: {made.stderr.strip()}"
    _sh("ip", "netns", "del", probe, check=False)
    return None


@dataclasses.dataclass
class Cluster:
    names: list[str]  # hostnames, host k at index k-1
    addresses: list[str]
    namespaces: list[str]
    sshd: list[subprocess.Popen]
    hostfile: Path
    sshd_logs: list[Path]
    workdir: Path

    def command(self, host: int, cwd: Path, *cmd: str) -> list[str]:
        """`cmd` run in `cwd` on host `host` (1-based): in its network, UTS and mount namespaces."""
        return ["nsenter", "--target", str(self.sshd[host - 1].pid), "--net", "--uts", "--mount", f"--wd={cwd}",
                *cmd]

    def pids(self, namespaces: list[str] | None = None) -> list[int]:
        """Every process in the given namespaces (default: all of the cluster's): sshd, ssh sessions, ranks."""
        pids = []
        for ns in self.namespaces if namespaces is None else namespaces:
            pids += [int(p) for p in _sh("ip", "netns", "pids", ns, check=False).stdout.split()]
        return pids

    def lose(self, host: int) -> None:
        """Host `host` dies as a crashed node looks to the others: its link goes down and its address goes
        (nothing it sent after that arrives, not even a connection reset), then every process on it is killed."""
        name = self.names[host - 1]
        _sh("ip", "-n", name, "link", "set", IFACE, "down")
        _sh("ip", "-n", name, "addr", "flush", "dev", IFACE)
        for pid in self.pids([name]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.sshd[host - 1].wait(timeout=10)

    def restore(self, host: int) -> None:
        """Host `host` comes back after lose(): its address, its link and a new sshd (under the same name)."""
        name, address, log = self.names[host - 1], self.addresses[host - 1], self.sshd_logs[host - 1]
        _sh("ip", "-n", name, "addr", "add", f"{address}/24", "dev", IFACE)
        _sh("ip", "-n", name, "link", "set", IFACE, "up")
        started = log.read_text().count("Server listening")
        self.sshd[host - 1] = _start_sshd(self.workdir, name, address, log)
        _wait_listening(log, self.sshd[host - 1], times=started + 1)


def _write_host_files(etc: Path, names: list[str], addresses: list[str], key: Path) -> None:
    etc.mkdir(parents=True)
    (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
        f"{address} {name}\n" for address, name in zip(addresses, names)))
    (etc / "ssh_config").write_text(
        f"Host *\n  IdentityFile {key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
        # Without it, horovodrun's ssh session to a host that crashed waits for TCP's keepalive (2 hours), and an
        # elastic job with it: Horovod's driver counts that worker as running until its ssh ends (docs/CLUSTER.md).
        "  ServerAliveInterval 5\n  ServerAliveCountMax 2\n")


def _sshd_config(workdir: Path, address: str, name: str) -> Path:
    path = workdir / f"sshd_{name}.conf"
    path.write_text(
        f"ListenAddress {address}\nHostKey {workdir}/hostkey\nPermitRootLogin prohibit-password\n"
        f"AuthorizedKeysFile {workdir}/id.pub\nPidFile none\nStrictModes no\nUsePAM no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nMaxStartups 100\nLogLevel INFO\n")
    return path


def _start_sshd(workdir: Path, name: str, address: str, log: Path) -> subprocess.Popen:
    """sshd for host `name`, in its network namespace and in fresh UTS and mount namespaces of its own."""
    return subprocess.Popen(
        ["ip", "netns", "exec", name, "unshare", "--uts", "--mount", "sh", "-c", _ENTER_HOST, "sh",
         str(workdir / "etc"), name, "/usr/sbin/sshd", "-D", "-f", str(_sshd_config(workdir, address, name)),
         "-E", str(log)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_listening(log: Path, proc: subprocess.Popen, timeout: float = 20, times: int = 1) -> None:
    """Until sshd's log says it listens (for the `times`-th time: sshd appends to its log when restarted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().count("Server listening") >= times:
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    text = log.read_text() if log.exists() else ""
    raise RuntimeError(f"sshd did not start ({log}): {text.strip()[-500:]}")


def _kill_all(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _running(p)]
            time.sleep(0.1)


def _running(pid: int) -> bool:
    """pid exists and has not exited: a zombie (an sshd this process started and has not reaped yet) has."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # the state follows the command name, which may hold spaces


@contextlib.contextmanager
def hosts(n: int, workdir: Path):
    """Yields a Cluster of n hosts (see the module docstring); removes all of it on exit."""
    if not 1 <= n <= 254:
        raise ValueError(f"a cluster has 1 to 254 hosts on {SUBNET}.0/24, not {n}")
    tag = uuid.uuid4().hex[:6]
    prefix = f"hm{tag}"
    hub = f"{prefix}hub"
    names = [f"{prefix}-{k}" for k in range(1, n + 1)]
    addresses = [f"{SUBNET}.{k}" for k in range(1, n + 1)]
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(names, addresses, namespaces=[], sshd=[], hostfile=workdir / "hostfile",
                      sshd_logs=[workdir / f"sshd_{name}.log" for name in names], workdir=workdir)
    try:
        _sh("ip", "netns", "add", hub)
        cluster.namespaces.append(hub)
        _sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", hub, "link", "set", "br0", "up")
        for k, (name, address) in enumerate(zip(names, addresses), start=1):
            _sh("ip", "netns", "add", name)  # a host's network namespace is named after its hostname
            cluster.namespaces.append(name)
            _sh("ip", "-n", hub, "link", "add", f"p{k}", "type", "veth", "peer", "name", IFACE, "netns", name)
            _sh("ip", "-n", hub, "link", "set", f"p{k}", "master", "br0", "up")
            _sh("ip", "-n", name, "addr", "add", f"{address}/24", "dev", IFACE)
            _sh("ip", "-n", name, "link", "set", IFACE, "up")
            _sh("ip", "-n", name, "link", "set", "lo", "up")
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", prefix, "-f", str(workdir / "id"))
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", prefix, "-f", str(workdir / "hostkey"))
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        _write_host_files(workdir / "etc", names, addresses, workdir / "id")
        for name, address, log in zip(names, addresses, cluster.sshd_logs):
            cluster.sshd.append(_start_sshd(workdir, name, address, log))
        for proc, log in zip(cluster.sshd, cluster.sshd_logs):
            _wait_listening(log, proc)
        cluster.hostfile.write_text("".join(f"{name} slots=1\n" for name in names))
        yield cluster
    finally:
        _kill_all(cluster.pids())
        for proc in cluster.sshd:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for ns in reversed(cluster.namespaces):  # a host's veth pair and the hub's bridge go with them
            _sh("ip", "netns", "del", ns, check=False)


def hosts_fixture(n: int):
    """A pytest fixture of n hosts under the test's tmp_path; skips with the reason where they cannot exist."""

    @pytest.fixture
    def cluster(tmp_path):
        reason = unavailable()
        if reason:
            pytest.skip(reason)
        with hosts(n, tmp_path / "hosts") as made:
            yield made

    return cluster


def _meminfo_used_bytes() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = lambda key: int(info[key].split()[0])  # noqa: E731
    return (kib("MemTotal") - kib("MemAvailable")) * 1024


def _rss_pss_bytes(pid: int, marker: str) -> tuple[int, int]:
    """(RSS, PSS) of `pid` if its command line contains `marker`, else (0, 0) (also once it exited).

    RSS counts the pages a process shares with others (TensorFlow's libraries) in full for each
    one; PSS divides shared pages among their users, so a sum of PSS does not count them twice.
    """
    try:
        if marker not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return 0, 0
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0
    return int(fields["Rss"].split()[0]) * 1024, int(fields["Pss"].split()[0]) * 1024


@dataclasses.dataclass
class JobResult:
    proc: subprocess.CompletedProcess
    wall_seconds: float  # launch to exit
    peak_rss_bytes: int  # the largest sum, over samples, of the RSS of every process running `marker`
    peak_pss_bytes: int  # the same for PSS
    peak_used_bytes: int  # the machine's MemTotal - MemAvailable, largest sample (other jobs included)
    used_before_bytes: int

    def describe(self) -> str:
        gib = 1 << 30
        return (f"wall {self.wall_seconds:.0f} s; training processes' peak RSS sum {self.peak_rss_bytes / gib:.2f} GiB, "
                f"PSS sum {self.peak_pss_bytes / gib:.2f} GiB; machine used memory {self.used_before_bytes / gib:.2f} GiB "
                f"before, {self.peak_used_bytes / gib:.2f} GiB peak")


def run_job(cluster: Cluster, cmd: list[str], env: dict, cwd: Path, timeout: float,
            marker: str = "train.py") -> JobResult:
    """Runs `cmd` on host 1 and measures it: wall time, and memory sampled every 0.5 s."""
    used_before = _meminfo_used_bytes()
    peaks = {"rss": 0, "pss": 0, "used": used_before}
    done = threading.Event()

    def sample():
        while not done.wait(0.5):
            sizes = [_rss_pss_bytes(pid, marker) for pid in cluster.pids()]
            peaks["rss"] = max(peaks["rss"], sum(rss for rss, _ in sizes))
            peaks["pss"] = max(peaks["pss"], sum(pss for _, pss in sizes))
            peaks["used"] = max(peaks["used"], _meminfo_used_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.monotonic()
    sampler.start()
    try:
        proc = subprocess.run(cluster.command(1, cwd, *cmd), env=env, capture_output=True, text=True,
                              timeout=timeout)
    finally:
        done.set()
        sampler.join()
    return JobResult(proc, time.monotonic() - start, peaks["rss"], peaks["pss"], peaks["used"], used_before)


def write_equal_shards(out: Path, shards: int, windows: int, seq_length: int) -> Path:
    """Data where N ranks x 1 stream and 1 rank x N streams read the same bytes in the same order.

    Every split has `shards` shards, each ONE record of windows * seq_length + 1 bytes (exactly
    `windows` training windows). The split cuts into N streams exactly at the record boundaries,
    so stream r is record r whatever the number of ranks.
    """
    from conftest import write_shards
    from horovod_mlstm import corpus
    from horovod_mlstm.records import SPLITS

    text = " ".join(corpus.texts(400, seed=7)).encode()
    length = windows * seq_length + 1
    if len(text) < length:
        raise ValueError(f"{windows} windows of {seq_length} bytes need {length} bytes; the corpus has {len(text)}")

    def record(split, i):
        start = random.Random(f"{split}{i}").randrange(0, len(text) - length + 1)
        return [text[start:start + length]]

    return write_shards(out, {split: [record(split, i) for i in range(shards)] for split in SPLITS})
