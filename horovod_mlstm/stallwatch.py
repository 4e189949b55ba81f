"""Ends a training job that a frozen rank would hang forever, with one line naming that rank.

Horovod's stall check (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS, which the launchers set) runs inside rank 0's
coordination cycle, and a frozen rank (a hung host, `kill -STOP`) blocks that cycle too, so it never fires.
Measured with Horovod 0.28.1 and 2 ranks: under MPI the job then waits forever without a word; under Gloo rank 0
gives up after HOROVOD_GLOO_TIMEOUT_SECONDS (30 s) without naming a rank. The check does fire for a rank that is
alive but does not reach the collective (under MPI only), and names it ("Missing ranks").

So each rank also beats a heartbeat file, MODEL_DIR/heartbeats/rank-R, from a thread (the model dir is on storage
every rank writes to already: each writes its RNN state rows there). When no step has finished for the stall
shutdown time, a rank whose watched peers' heartbeats have stopped names them on stderr and ends its own process;
the launcher's runner then ends the job (horovodrun and mpirun on a failed rank, srun with --kill-on-bad-exit).
Rank 0 watches every rank; the others watch rank 0. If every heartbeat goes on, a rank waits a little longer
(Horovod's own check names a rank stuck outside a collective) and then ends with a line saying so.
Started only with several ranks, when the launcher set a stall shutdown time and did not disable the check.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from horovod_mlstm import files

SHUTDOWN_VARIABLE = "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"
DISABLE_VARIABLE = "HOROVOD_STALL_CHECK_DISABLE"
SILENT_BEATS = 3  # a peer whose heartbeat did not change for this many beats is taken to be frozen or gone


def shutdown_seconds(environ=os.environ) -> float:
    """The stall shutdown time the launcher gave the ranks; 0 = no watch."""
    if environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        return 0.0
    try:
        return max(float(environ.get(SHUTDOWN_VARIABLE, "0")), 0.0)
    except ValueError:
        return 0.0


class StallWatch:
    """Call progress(step) after every step and stop() at the end; see the module docstring. The time runs from
    the first step on (before it, tracing and compiling the step take long on every rank)."""

    def __init__(self, model_dir: str, rank: int, world: int, seconds: float):
        self.rank, self.world, self.seconds = rank, world, seconds
        self.beat = max(1.0, min(10.0, seconds / 6))
        self.directory = os.path.join(model_dir, "heartbeats")
        self.step = 0
        self.last_progress = None  # armed by the first step: tracing and compiling it take long on every rank
        self._stopped = threading.Event()

    def start(self) -> "StallWatch":
        os.makedirs(self.directory, exist_ok=True)
        threading.Thread(target=self._watch, name="stall-watch", daemon=True).start()
        return self

    def progress(self, step: int) -> None:
        self.step, self.last_progress = step, time.monotonic()

    def stop(self) -> None:
        self._stopped.set()

    def _next_wait(self) -> float:
        """A beat, or less when the stall shutdown time falls earlier: the watch then acts on time, before
        Horovod's own check (whose clock starts later, when the first rank submits the next step's tensors)."""
        remaining = self.last_progress + self.seconds - time.monotonic() if self.last_progress else 0
        return min(self.beat, remaining) if remaining > 0 else self.beat

    def _path(self, rank: int) -> str:
        return os.path.join(self.directory, f"rank-{rank}")

    def _watch(self) -> None:
        peers = [r for r in range(self.world) if r != self.rank] if self.rank == 0 else [0]
        seen = {r: None for r in peers}
        changed = {r: time.monotonic() for r in peers}
        beats = 0
        while not self._stopped.wait(self._next_wait()):
            beats += 1
            try:  # a write that fails (full disk) only makes this rank look silent to the others
                files.write_bytes(self._path(self.rank), f"{os.getpid()} {beats} {self.step}\n".encode())
            except OSError:
                pass
            now = time.monotonic()
            for r in peers:
                try:
                    with open(self._path(r)) as f:
                        text = f.read()
                except OSError:
                    text = None
                if text != seen[r]:
                    seen[r], changed[r] = text, now
            if self.last_progress is None or now - self.last_progress < self.seconds:
                continue
            idle = now - self.last_progress
            silent = [r for r in peers if now - changed[r] > SILENT_BEATS * self.beat]
            if silent:
                self._end(f"rank{'s' * (len(silent) > 1)} {', '.join(map(str, silent))} stalled: "
                          f"{'their' if len(silent) > 1 else 'its'} heartbeat stopped and no step has finished for "
                          f"{idle:.0f} s (last step {self.step}); ending the job (stall shutdown after {self.seconds:g} s)")
            elif idle >= self.seconds + SILENT_BEATS * self.beat:
                self._end(f"no step has finished for {idle:.0f} s (last step {self.step}) while "
                          f"{'every rank' if self.rank == 0 else 'rank 0'} kept its heartbeat: a rank is stuck outside "
                          f"the collectives; ending the job (stall shutdown after {self.seconds:g} s)")

    def _end(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def watch(model_dir: str, rank: int, world: int) -> StallWatch | None:
    """A started watch when the launcher asked for a stall shutdown and there are several ranks, else None."""
    seconds = shutdown_seconds()
    if world < 2 or not seconds:
        return None
    return StallWatch(model_dir, rank, world, seconds).start()
