"""The training commands' shared main (stopping.run_command): every way it ends but a stop, in-process.
A stop's exit 75 and resume are tested through the real commands (test_train.py, test_finetune.py)."""

from __future__ import annotations

import dataclasses

import pytest
import tensorflow as tf

from horovod_mlstm import distributed as dist
from horovod_mlstm import stopping

pytestmark = pytest.mark.unit


@dataclasses.dataclass(frozen=True)
class Config:
    precision: str = "fp32"
    max_runtime_minutes: float = 0.0

    @classmethod
    def from_flags(cls):
        return cls()


def command(run, argv=("prog",), failures=(ValueError,)):
    seen = {}

    def record(cfg, stop):
        seen["cfg"], seen["stop"] = cfg, stop
        return run(cfg)

    stopping.run_command(list(argv), "job", Config, lambda cfg: dist.init(), record, failures,
                         lambda cfg: "hint: lower --x")
    return seen


def test_a_finished_run_returns_with_the_precision_said_first(capsys):
    seen = command(lambda cfg: {"stopped_early": False})
    assert seen["cfg"].precision == "fp32" and isinstance(seen["stop"], stopping.StopRequest)
    assert capsys.readouterr().out.splitlines()[0] == "[job] precision fp32 (as asked)"


@pytest.mark.parametrize("error, line", [
    (ValueError("bad data"), "error: bad data"),
    (MemoryError(), "error: out of memory (hint: lower --x)"),
    (tf.errors.ResourceExhaustedError(None, None, "OOM when allocating"), "error: out of memory (hint: lower --x)"),
    (tf.errors.UnknownError(None, None, "Horovod has been shut down. This was caused by ..."),
     "error: Horovod shut the job down"),
])
def test_expected_failures_are_one_error_line(error, line):
    def fail(cfg):
        raise error
    with pytest.raises(SystemExit) as exit:
        command(fail)
    assert str(exit.value.code).startswith(line)


def test_unexpected_failures_and_arguments():
    def fail(cfg):
        raise tf.errors.UnknownError(None, None, "something else")
    with pytest.raises(tf.errors.UnknownError):  # not hidden behind a line: a traceback names it
        command(fail)
    with pytest.raises(SystemExit, match=r"^error: unexpected arguments \['extra'\]"):
        command(lambda cfg: {"stopped_early": False}, argv=("prog", "extra"))
