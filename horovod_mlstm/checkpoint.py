"""Checkpoints that survive kill -9 and scale: rank 0 writes the model, each rank its own RNN state.

tf.train.CheckpointManager writes a checkpoint's files first and then atomically replaces
the small `checkpoint` index that names the latest one, so a job killed mid-save still
points at the previous complete checkpoint. If the newest checkpoint is damaged anyway
(a truncated or missing file on a flaky filesystem), restore says so in one line and falls
back to the one before it; any other failure (an I/O error, out of memory) stops with one
line instead, since a fallback would later overwrite the newer checkpoint. If the index
itself is lost, the checkpoints are found by their files.

The RNN state of every stream is part of a checkpoint, but no rank holds all of it: each
rank writes its own rows to MODEL_DIR/checkpoints/rnn_state-<step>/rows-<first>-<end>.npy
(on the shared filesystem), and a job of any size reads back the rows it now carries.
A checkpoint counts only when its state files cover every stream.
"""

from __future__ import annotations

import glob
import os
import re
import shutil

import numpy as np
import tensorflow as tf
from absl import logging

from horovod_mlstm import files


class CheckpointError(Exception):
    """No checkpoint in the model directory could be read, or one could not be written."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint that does not fit this job: fatal, never a reason to fall back to an older one."""


def _reason(e: Exception) -> str:
    """The cause in an OSError or a TensorFlow op error ("{{function_node ...}} PATH; CAUSE [Op:SaveV2]")."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    m = re.search(r";\s*([^;]+?)\s*(\[Op:\w+\])?$", e.message.strip())
    return m[1] if m else e.message.strip().splitlines()[0][:200]


def step_of(path: str) -> int:
    return int(path.rsplit("-", 1)[1])


# ---------------------------------------------------------------- RNN state, one file per rank

def state_dir(directory: str, step: int) -> str:
    return os.path.join(directory, f"rnn_state-{step}")


def save_state_rows(directory: str, step: int, first_row: int, h: np.ndarray, c: np.ndarray) -> str:
    """Writes this rank's rows [first_row, first_row + len(h)) of the state at `step`, atomically."""
    folder = state_dir(directory, step)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rows-{first_row:09d}-{first_row + len(h):09d}.npy")
    with files.replace_whole(path, "wb") as f:
        np.save(f, np.stack([h, c]).astype(np.float32))
    return path


def _row_files(folder: str) -> list[tuple[int, int, str]]:
    found = []
    for path in glob.glob(os.path.join(folder, "rows-*-*.npy")):
        m = re.fullmatch(r"rows-(\d+)-(\d+)\.npy", os.path.basename(path))
        if m:
            found.append((int(m[1]), int(m[2]), path))
    return sorted(found)


def check_state(directory: str, step: int, total_rows: int, hidden: int) -> None:
    """Raises CheckpointError unless the state files of `step` cover rows [0, total_rows) exactly.

    Reads only the .npy headers (memory-mapped), so rank 0 checks a 1 GiB state in milliseconds.
    """
    folder = state_dir(directory, step)
    if not os.path.isdir(folder):
        raise CheckpointError(f"it has no RNN state folder {folder} (checkpoints of versions before per-rank "
                              "state files have none)")
    covered = 0
    for first, end, path in _row_files(folder):
        if first != covered:
            break
        try:
            shape = np.load(path, mmap_mode="r").shape
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path} is damaged ({str(e).splitlines()[0][:120]})") from None
        if shape != (2, end - first, hidden):
            raise CheckpointError(f"{path} holds a state of shape {shape}, not (2, {end - first}, {hidden})")
        covered = end
    if covered != total_rows:
        raise CheckpointError(f"the RNN state in {folder} covers streams [0, {covered}) of {total_rows}")


def load_state_rows(directory: str, step: int, first_row: int, rows: int, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's rows of the state at `step`, from whichever files hold them (any earlier world size)."""
    out = np.zeros([2, rows, hidden], np.float32)
    need, end_row = first_row, first_row + rows
    for first, end, path in _row_files(state_dir(directory, step)):
        lo, hi = max(first, first_row), min(end, end_row)
        if lo < hi and lo <= need:
            out[:, lo - first_row:hi - first_row] = np.load(path, mmap_mode="r")[:, lo - first:hi - first]
            need = max(need, hi)
    if need < end_row:
        raise CheckpointError(f"no RNN state for streams [{need}, {end_row}) in {state_dir(directory, step)}")
    return out[0], out[1]


def clear_state(directory: str, step: int) -> None:
    """Removes what an interrupted earlier attempt wrote for `step` (possibly from another world size)."""
    shutil.rmtree(state_dir(directory, step), ignore_errors=True)


# ---------------------------------------------------------------- model and optimizer checkpoints

# What TensorFlow raises for a damaged or missing checkpoint file: a truncated .data file is an
# IndexError, the rest are OpErrors whose message names the damage.
_DAMAGE = re.compile(r"Read less bytes|checksum does not match|too short to be an sstable|not an sstable|corrupt|"
                     r"No such file or directory|Data loss|truncated|bad magic|Unable to open table", re.IGNORECASE)


def damaged(e: Exception) -> bool:
    """The checkpoint's files are damaged or missing (fall back to an older one), as opposed to a failure of
    the machine (I/O error, out of memory) that a fallback would hide."""
    if isinstance(e, (tf.errors.DataLossError, tf.errors.NotFoundError, IndexError)):
        return True
    return isinstance(e, tf.errors.OpError) and not isinstance(e, tf.errors.ResourceExhaustedError) \
        and bool(_DAMAGE.search(e.message))


class Checkpointer:
    """A CheckpointManager over `objects` in MODEL_DIR/checkpoints; `writer`: this process writes them."""

    def __init__(self, model_dir: str, keep: int = 3, writer: bool = True, **objects):
        self.directory = os.path.join(model_dir, "checkpoints")
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.keep = keep
        self.writer = writer

    def _found_on_disk(self) -> list[str]:
        """Checkpoint prefixes whose files are complete (an .index is written last), oldest first."""
        return sorted((p[:-len(".index")] for p in glob.glob(os.path.join(self.directory, "ckpt-*.index"))
                       if re.fullmatch(r"ckpt-\d+", os.path.basename(p)[:-len(".index")])), key=step_of)

    def _recover_index(self) -> None:
        """Rebuilds a lost `checkpoint` index from the files, so intact checkpoints are used, not overwritten."""
        if tf.train.get_checkpoint_state(self.directory) is None and self._found_on_disk():
            found = self._found_on_disk()
            logging.warning("%s/checkpoint (the index) is missing; found %s on disk", self.directory,
                            ", ".join(os.path.basename(p) for p in found))
            tf.compat.v1.train.update_checkpoint_state(self.directory, found[-1], all_model_checkpoint_paths=found)

    def candidates(self) -> list[str]:
        """Checkpoint prefixes, newest first."""
        state = tf.train.get_checkpoint_state(self.directory)
        paths = list(state.all_model_checkpoint_paths) if state else self._found_on_disk()
        return list(reversed(paths))

    def restore(self, expect_partial: bool = False, check=None) -> str | None:
        """Restores the newest readable checkpoint; returns its path, or None if there is none.

        `check(path)` may raise CheckpointError to skip a checkpoint (e.g. incomplete RNN state), or
        CheckpointMismatch to stop.
        """
        if self.writer:
            self._recover_index()
        tried = []
        for path in self.candidates():
            try:
                if check:
                    check(path)
                status = self.checkpoint.restore(path)
                if expect_partial:
                    status.expect_partial()
                else:
                    status.assert_existing_objects_matched()
                return path
            except CheckpointMismatch:
                self._quiet_failed_restores()
                raise
            except Exception as e:  # a damaged file fails in many ways (IndexError, OpErrors of several kinds)
                reason = (str(e).strip().splitlines() or [""])[0][:200]
                if "incompatible tensor with shape" in reason:  # intact, but another architecture
                    self._quiet_failed_restores()
                    raise CheckpointError(f"checkpoint {path} does not fit the model config.json describes ({reason})") from None
                if not damaged(e):
                    self._quiet_failed_restores()
                    raise CheckpointError(f"cannot restore {path}: {type(e).__name__}: {reason or 'no message'}; not "
                                          "falling back to an older checkpoint, which would later overwrite it: fix "
                                          "the cause and run again") from None
                logging.warning("checkpoint %s is unreadable (%s); trying the previous one", path, reason)
                tried.append(path)
        if tried:
            self._quiet_failed_restores()
            raise CheckpointError(f"no readable checkpoint in {self.directory} (tried {', '.join(tried)})")
        return None

    @staticmethod
    def _quiet_failed_restores() -> None:
        """Before a fatal CheckpointError: a failed restore leaves objects that, torn down at exit,
        log a warning per variable (hundreds of lines) and would bury the one-line error."""
        tf.get_logger().setLevel("ERROR")

    def save(self, step: int) -> str:
        """Writes checkpoint `step` (the RNN state files of `step` must already be complete).

        A failed write (disk full, permissions) raises CheckpointError and leaves no temporary files;
        the previous checkpoints stay as they were.
        """
        # A manager made now reads the index as it is: after an elastic reset the writing rank may have
        # changed, and the checkpoints the previous one wrote must still be rotated out in turn.
        manager = tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep=self.keep)
        try:
            return manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as e:
            for temp in glob.glob(os.path.join(self.directory, f"ckpt-{step}*_temp*")):
                shutil.rmtree(temp, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {self.directory}/ckpt-{step}: {_reason(e)}") from None

    def prune_states(self, also_keep: tuple = ()) -> None:
        """Removes RNN state folders no kept checkpoint (nor a step in `also_keep`) refers to."""
        keep = {step_of(p) for p in self.candidates()} | set(also_keep)
        for folder in glob.glob(os.path.join(self.directory, "rnn_state-*")):
            if step_of(folder) not in keep:
                shutil.rmtree(folder, ignore_errors=True)
