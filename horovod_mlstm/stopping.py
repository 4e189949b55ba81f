"""Stopping a job early on request, the same way in every training CLI (train, finetune).

SIGTERM, SIGUSR1 or SIGINT (what a scheduler sends before a time limit or preemption, or Ctrl-C), or
a wall-clock limit, set a request that each rank votes into its next update step (update.py); every
rank then stops after that same step, the job checkpoints and exits with EXIT_STOPPED, and the same
command resumes it.
"""

from __future__ import annotations

import os
import signal
import sys
import time

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
