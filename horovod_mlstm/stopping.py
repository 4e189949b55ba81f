"""How a training command (train, finetune) runs and ends, the same way in both.

`run_command`: the config from the flags, Horovod started, the precision chosen and said on the first
line, the job run; every expected failure one `error:` line and a non-zero exit.

Stopping early on request: SIGTERM, SIGUSR1 or SIGINT (what a scheduler sends before a time limit or
preemption, or Ctrl-C), or a wall-clock limit, set a request that each rank votes into its next update
step (update.py); every rank then stops after that same step, the job checkpoints and exits with
EXIT_STOPPED, and the same command resumes it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable

import tensorflow as tf

from horovod_mlstm import distributed as dist
from horovod_mlstm import hardware

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early and checkpointed; run the same command to resume
INTERRUPTED_TWICE = ("error: interrupted twice: stopped without checkpointing this step; the last checkpoint is "
                     "intact and the same command resumes from it")


class StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGINT or the wall-clock limit; each rank votes it into every step.

    A second Ctrl-C aborts at once (Python's default), without the checkpoint.
    """

    def __init__(self, max_minutes: float):
        self.reason = None
        self.deadline = time.time() + 60 * max_minutes if max_minutes else None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.reason = self.reason or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def vote(self) -> float:
        if self.reason is None and self.deadline and time.time() > self.deadline:
            self.reason = "--max_runtime_minutes"
        return 1.0 if self.reason else 0.0


def exit_if_stopped(summary: dict | None) -> None:
    """After a job that stopped early (everything is on disk): exit EXIT_STOPPED at once, skipping the
    interpreter's teardown, seconds for TensorFlow on a busy host (horovodrun kills its ranks 5 s after
    its own SIGTERM)."""
    if summary and summary["stopped_early"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_STOPPED)


def run_command(argv: list[str], name: str, config_class, start: Callable, run: Callable,
                failures: tuple[type[BaseException], ...], memory_hint: Callable[..., str]) -> None:
    """A training command's main: CONFIG_CLASS.from_flags(), START(cfg) (Horovod), the precision resolved,
    RUN(cfg, stop) -> summary. FAILURES are expected errors, each one `error:` line; out of memory says
    what to lower (MEMORY_HINT(cfg)); a stop exits EXIT_STOPPED."""
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]} (flags are --name=value)")
    try:
        cfg = config_class.from_flags()
    except ValueError as e:
        sys.exit(f"error: {e}")
    stop = StopRequest(cfg.max_runtime_minutes)
    try:  # every rank refuses what it cannot run (a reduction its launcher lacks, a crashing precision) alike
        start(cfg)
        precision, precision_line = hardware.resolve(cfg.precision)
    except ValueError as e:
        sys.exit(f"error: {e}")
    cfg = dataclasses.replace(cfg, precision=precision)
    if dist.is_chief():
        print(f"[{name}] {precision_line}", flush=True)
    try:
        summary = run(cfg, stop)
    except failures as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C: abort without the checkpoint
        print(INTERRUPTED_TWICE, file=sys.stderr)
        sys.exit(130)
    except tf.errors.UnknownError as e:
        if "Horovod has been shut down" not in e.message:
            raise
        sys.exit("error: Horovod shut the job down (a rank stalled past the stall shutdown time, left or failed; "
                 "Horovod's lines above say which); the last checkpoint is intact and the same command resumes")
    except (MemoryError, tf.errors.ResourceExhaustedError):
        sys.exit(f"error: out of memory ({memory_hint(cfg)})")
    exit_if_stopped(summary)
