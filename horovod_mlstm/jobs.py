"""train.py as a subprocess: the one way the benchmark and the experiments start training jobs.

A job of one process is `python train.py ARGS`; more processes go through horovodrun, on
localhost or on the hosts of a hostfile (`host slots=N` lines, as in hostfiles/).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile

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


def _check(train_args: list[str], returncode: int, stderr: str) -> None:
    """JobError naming the job's last line of stderr if it exited non-zero."""
    if returncode != 0:
        lines = [line for line in stderr.splitlines() if line.strip()] or ["(no output on stderr)"]
        raise JobError(f"train.py {' '.join(train_args[:1])} ... exited {returncode}: {lines[-1]}")


def run(train_args: list[str], np: int = 1, controller: str = "gloo", hostfile: str = "") -> str:
    """Runs a job to the end and returns its output; JobError names its last line if it fails."""
    proc = subprocess.run(command(train_args, np, controller, hostfile), capture_output=True, text=True,
                          cwd=REPO, env=ENV)
    _check(train_args, proc.returncode, proc.stderr)
    return proc.stdout


def run_dir(out_dir: str, name: str, settings: list[str], np: int = 1) -> str:
    """OUT_DIR/NAME_<digest of SETTINGS and np>: where run_once keeps that job."""
    digest = hashlib.sha1(" ".join(settings + [f"np={np}"]).encode()).hexdigest()[:8]
    return os.path.join(out_dir, f"{name}_{digest}")


def read_summary(model_dir: str) -> dict | None:
    """MODEL_DIR/summary.json with null BPCs read as NaN (it writes non-finite numbers as null), or None."""
    try:
        with open(os.path.join(model_dir, "summary.json")) as f:
            return json.load(f, object_hook=lambda d: {k: float("nan") if v is None and "bpc" in k else v
                                                       for k, v in d.items()})
    except FileNotFoundError:
        return None


def finished(summary: dict | None) -> bool:
    """The run reached its --train_steps: not stopped early by a signal or --max_runtime_minutes (whose
    summary.json train.py also writes, with stopped_early set)."""
    return bool(summary) and summary.get("stopped_early") is None and \
        summary["final_step"] >= summary.get("train_steps", summary["final_step"])


def run_once(out_dir: str, name: str, settings: list[str], run_args: list[str], announce: str, np: int = 1,
             controller: str = "gloo", hostfile: str = "") -> tuple[str, dict, bool]:
    """A job named by what decides its result, trained only if it has not finished before:
    (its model_dir, its summary.json with null BPCs read as NaN, whether it was reused).

    The directory is OUT_DIR/NAME_<digest of SETTINGS and np>, so an experiment run again trains
    nothing it already has, and a run that stopped early resumes from its checkpoint. RUN_ARGS
    (logging, checkpoint cadence, threads) do not change the result and stay out of the digest;
    --model_dir comes after SETTINGS, so it overrides a flagfile's. ANNOUNCE is printed, in one
    write (runs may start concurrently), before training.
    """
    model_dir = run_dir(out_dir, name, settings, np)
    reused = finished(read_summary(model_dir))
    if not reused:
        print(announce + "\n", end="", flush=True)
        run([*settings, f"--model_dir={model_dir}", *run_args], np, controller, hostfile)
    summary = read_summary(model_dir)
    if not finished(summary):
        raise JobError(f"train.py --model_dir={model_dir} ended without reaching its steps "
                       f"(stopped early: {(summary or {}).get('stopped_early')}); run the experiment again to resume it")
    return model_dir, summary, reused


def run_together(jobs_args: list[list[str]]) -> list[str]:
    """Runs single-process jobs concurrently to the end; their outputs, in order (JobError as run).

    Output goes to temporary files, not pipes, so no job stalls on a full pipe while another
    is waited for.
    """
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in jobs_args]
    procs = [subprocess.Popen(command(args), stdout=out, stderr=err, text=True, cwd=REPO, env=ENV)
             for args, (out, err) in zip(jobs_args, files)]
    codes = [proc.wait() for proc in procs]
    outputs = []
    for args, code, (out, err) in zip(jobs_args, codes, files):
        with out, err:
            out.seek(0), err.seek(0)
            _check(args, code, err.read())
            outputs.append(out.read())
    return outputs
