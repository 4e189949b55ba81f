"""jobs.py: experiments reuse a run only when it reached its steps; one cut short resumes."""

import json

import pytest

from horovod_mlstm import jobs

pytestmark = pytest.mark.unit


def summary(final_step, train_steps=10, stopped_early=None):
    return {"final_step": final_step, "train_steps": train_steps, "stopped_early": stopped_early, "val_bpc": None}


@pytest.mark.parametrize("value, done", [
    (None, False),
    (summary(10), True),
    (summary(6, stopped_early="SIGTERM"), False),
    (summary(6, stopped_early="--max_runtime_minutes"), False),
    (summary(6), False),
    ({"final_step": 10, "stopped_early": None}, True),  # written before summary.json named its steps
])
def test_finished_means_the_steps_were_reached(value, done):
    assert jobs.finished(value) is done


def test_a_run_cut_short_is_resumed_not_reported(tmp_path, monkeypatch):
    model_dir = jobs.run_dir(str(tmp_path), "b16", ["--train_steps=10"])
    (tmp_path / model_dir).mkdir(parents=True)
    (tmp_path / model_dir / "summary.json").write_text(json.dumps(summary(6, stopped_early="SIGINT")))
    started = []

    def train(args, np, controller, hostfile):
        started.append(args)
        (tmp_path / model_dir / "summary.json").write_text(json.dumps(summary(10)))

    monkeypatch.setattr(jobs, "run", train)
    _, result, reused = jobs.run_once(str(tmp_path), "b16", ["--train_steps=10"], [], "training b16")
    assert not reused and len(started) == 1 and result["final_step"] == 10
    _, result, reused = jobs.run_once(str(tmp_path), "b16", ["--train_steps=10"], [], "training b16")
    assert reused and len(started) == 1 and result["val_bpc"] != result["val_bpc"]  # null BPC read as NaN
