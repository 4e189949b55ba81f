"""train.py as a subprocess: the one way the benchmark and the experiments start training jobs.

A job of one process is `python train.py ARGS`; more processes go through horovodrun, on
localhost or on the hosts of a hostfile (`host slots=N` lines, as in hostfiles/).
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


class JobError(RuntimeError):
    """A training job exited non-zero; the message is its last line of stderr."""


def command(train_args: list[str], np: int = 1, controller: str = "gloo", hostfile: str = "") -> list[str]:
    """The command line of a train.py job with `np` processes (controller: gloo or mpi)."""
    train = [sys.executable, os.path.join(REPO, "train.py"), *train_args]
    if np == 1:
        return train
    hosts = ["--hostfile", hostfile] if hostfile else ["-H", f"localhost:{np}"]
    return [os.path.join(os.path.dirname(sys.executable), "horovodrun"), f"--{controller}", "-np", str(np),
            *hosts, *train]


def start(train_args: list[str], stdout, np: int = 1, controller: str = "gloo", hostfile: str = "") -> subprocess.Popen:
    """Starts a job writing to the open file `stdout` (stderr too), without waiting for it."""
    return subprocess.Popen(command(train_args, np, controller, hostfile), stdout=stdout, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO, env=ENV)


def run(train_args: list[str], np: int = 1, controller: str = "gloo", hostfile: str = "") -> str:
    """Runs a job to the end and returns its output; JobError names its last line if it fails."""
    proc = subprocess.run(command(train_args, np, controller, hostfile), capture_output=True, text=True,
                          cwd=REPO, env=ENV)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["(no output on stderr)"]
        raise JobError(f"train.py {' '.join(train_args[:1])} ... exited {proc.returncode}: {lines[-1]}")
    return proc.stdout
