"""Checkpoints that survive kill -9: written by rank 0, restored from the newest readable one.

tf.train.CheckpointManager writes a checkpoint's files first and then atomically replaces
the small `checkpoint` index that names the latest one, so a job killed mid-save still
points at the previous complete checkpoint. If the newest checkpoint is damaged anyway
(a truncated file on a flaky filesystem), restore says so in one line and falls back to
the one before it.
"""

from __future__ import annotations

import os

import tensorflow as tf
from absl import logging


class CheckpointError(Exception):
    """No checkpoint in the model directory could be read."""


class Checkpointer:
    """A CheckpointManager over `objects` in MODEL_DIR/checkpoints."""

    def __init__(self, model_dir: str, keep: int = 3, **objects):
        self.directory = os.path.join(model_dir, "checkpoints")
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep=keep)

    def candidates(self) -> list[str]:
        """Checkpoint prefixes, newest first."""
        state = tf.train.get_checkpoint_state(self.directory)
        return list(reversed(state.all_model_checkpoint_paths)) if state else []

    def restore(self, expect_partial: bool = False) -> str | None:
        """Restores the newest readable checkpoint; returns its path, or None if there is none."""
        tried = []
        for path in self.candidates():
            try:
                status = self.checkpoint.restore(path)
                if expect_partial:
                    status.expect_partial()
                else:
                    status.assert_existing_objects_matched()
                return path
            except Exception as e:  # a damaged file fails in many ways (DataLossError, IndexError, ...)
                reason = str(e).strip().splitlines()[0][:200]
                if "incompatible tensor with shape" in reason:  # intact, but another architecture
                    self._quiet_failed_restores()
                    raise CheckpointError(f"checkpoint {path} does not fit the model config.json describes ({reason})") from None
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

    def saved_shape(self, name: str) -> list[int] | None:
        """Shape of top-level object `name` in the newest readable checkpoint (None if none)."""
        for path in self.candidates():
            try:
                return tf.train.load_checkpoint(path).get_variable_to_shape_map().get(
                    f"{name}/.ATTRIBUTES/VARIABLE_VALUE")
            except Exception:  # unreadable: restore() will say so and fall back
                continue
        return None

    def save(self, step: int) -> str:
        return self.manager.save(checkpoint_number=step)


def latest_readable(model_dir: str, **objects) -> str:
    """Restores `objects` (e.g. just the model) from MODEL_DIR for evaluation and inference."""
    ckpt = Checkpointer(model_dir, **objects)
    path = ckpt.restore(expect_partial=True)
    if path is None:
        raise CheckpointError(f"no checkpoint in {ckpt.directory}")
    return path
