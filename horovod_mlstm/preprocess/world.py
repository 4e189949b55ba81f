"""The ranks of a preprocess job, its progress bar, and stopping on signals.

Without MPI the world is one rank. Under mpirun (mpi4py, imported only then) the other ranks
send rank 0 their progress as they go and their results (or error) at the end, and rank 0 tells
them to stop early once any rank failed. SIGTERM, SIGINT and SIGUSR1 (what mpirun passes on)
stop a rank; while the output switches they are held back, so it switches whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from absl import logging

from horovod_mlstm.preprocess.settings import PreprocessError

STOP_SIGNALS = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGUSR1: 143}  # signal -> exit status
_TAG_PROGRESS, _TAG_DONE, _TAG_STOP = 11, 12, 13  # MPI message tags


class ReportedElsewhere(Exception):
    """This rank stops because another rank failed; rank 0 prints the one line."""


class Stopped(BaseException):
    """SIGTERM, SIGINT or SIGUSR1 arrived: stop, publish nothing. BaseException: no handler may swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Abandoned(Exception):
    """Another rank failed, so this rank's remaining work is pointless."""


def stop_on_signals() -> None:
    """From now on a stop signal raises Stopped in the main thread."""
    def stop(signum, frame):
        raise Stopped(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)


def ignore_interrupts() -> None:
    """Workers leave Ctrl-C (sent to the whole process group) to their parent, which stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def signals_deferred():
    """Holds back the stop signals while the output switches, so it is switched completely or not at all."""
    held = set(STOP_SIGNALS)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        arrived = signal.sigpending() & held
        for signum in arrived:  # the work is published: a stop request now comes too late to matter
            signal.sigwait({signum})
            logging.warning("got %s while publishing; the output was published", signal.Signals(signum).name)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Progress:
    """Input bytes done, in total and of the first unfinished file, on rank 0's stderr (tqdm)."""

    def __init__(self, plans: list, enabled: bool):
        from tqdm import tqdm

        self.plans = plans
        self.done = [0] * len(plans)
        self.bar = tqdm(total=sum(p.size for p in plans), unit="B", unit_scale=True, desc="preprocess",
                        file=sys.stderr, mininterval=0.5, disable=not enabled)

    def add(self, file: int, nbytes: int) -> None:
        self.done[file] += nbytes
        current = next((p for p in self.plans if self.done[p.index] < p.size), None)
        self.bar.set_postfix_str(f"file {current.index + 1}/{len(self.plans)} {os.path.basename(current.path)} "
                                 f"{100 * self.done[current.index] / max(current.size, 1):.0f}%" if current else
                                 "all files read", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


class World:
    """The ranks of an mpirun job (one rank without MPI): their progress, results and failures."""

    def __init__(self):
        self.comm, self.rank, self.size = None, 0, 1
        if any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
            try:
                from mpi4py import MPI
            except ImportError as e:
                raise PreprocessError(f"launched under MPI, but mpi4py cannot be imported ({e})") from None
            self.MPI, self.comm = MPI, MPI.COMM_WORLD
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.progress: Progress | None = None
        self.outcomes: dict[int, tuple] = {}  # rank -> (results, error)
        self.told_to_stop: set[int] = set()

    def bcast(self, value):
        return self.comm.bcast(value, root=0) if self.comm else value

    def gather(self, value) -> list:
        return self.comm.gather(value, root=0) if self.comm else [value]

    def add_progress(self, file: int, nbytes: int) -> None:
        if self.rank == 0:
            self.progress.add(file, nbytes)
        else:
            self.comm.send((file, nbytes), dest=0, tag=_TAG_PROGRESS)

    def poll(self) -> None:
        """Rank 0: takes in the other ranks' messages; others: raises Abandoned once rank 0 said stop."""
        if self.comm is None:
            return
        status = self.MPI.Status()
        if self.rank != 0:
            if self.comm.iprobe(source=0, tag=_TAG_STOP):
                self.comm.recv(source=0, tag=_TAG_STOP)
                raise Abandoned()
            return
        while self.comm.iprobe(source=self.MPI.ANY_SOURCE, tag=_TAG_PROGRESS, status=status):
            self.progress.add(*self.comm.recv(source=status.Get_source(), tag=_TAG_PROGRESS))
        while self.comm.iprobe(source=self.MPI.ANY_SOURCE, tag=_TAG_DONE, status=status):
            source = status.Get_source()
            self.outcomes[source] = self.comm.recv(source=source, tag=_TAG_DONE)
            if self.outcomes[source][1] is not None:
                self._stop_the_others()
        if any(error is not None for _, error in self.outcomes.values()):
            raise Abandoned()

    def _stop_the_others(self) -> None:
        for rank in range(1, self.size):
            if rank not in self.outcomes and rank not in self.told_to_stop:
                self.comm.send(None, dest=rank, tag=_TAG_STOP)
                self.told_to_stop.add(rank)

    def barrier(self) -> None:
        """Ranks leave together: none exits (which makes mpirun end the job) before rank 0 has cleaned up."""
        if self.comm:
            self.comm.Barrier()

    def finish(self, results, error: str | None) -> dict[int, tuple] | None:
        """Every rank's (results, error) on rank 0 (None elsewhere), after each rank's share is done."""
        if self.rank != 0:
            self.comm.send((results, error), dest=0, tag=_TAG_DONE)
            return None
        if error is not None and self.comm is not None:
            self._stop_the_others()
        self.outcomes[0] = (results, error)
        while len(self.outcomes) < self.size:
            with contextlib.suppress(Abandoned):
                self.poll()
            time.sleep(0.05)
        outcomes, self.outcomes, self.told_to_stop = self.outcomes, {}, set()
        return outcomes
