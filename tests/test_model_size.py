"""The model-size experiment: equal characters for every size, a report, reuse of finished runs, bad flags."""

import json

import pytest

from conftest import TINY_MODEL_FLAGS, last_line, python

pytestmark = pytest.mark.cli


def test_two_tiny_sizes_train_on_equal_characters_and_are_reused(tmp_path, tiny_data):
    flagfile = tmp_path / "tiny.cfg"
    flagfile.write_text("\n".join([f"--data_dir={tiny_data}", *TINY_MODEL_FLAGS]) + "\n")
    out = tmp_path / "sizes"
    args = ["-m", "horovod_mlstm.experiments.model_size", f"--flagfile_train={flagfile}", f"--out_dir={out}",
            "--hidden_sizes=16,8", "--chars=4096", "--np=1", "--batch_size_per_worker=4", "--seq_length=32",
            "--evals=2"]
    proc = python(*args, check=True, timeout=600)
    report = json.loads((out / "results.json").read_text())
    runs = report["runs"]
    assert [r["hidden"] for r in runs] == [8, 16]
    assert all(r["steps"] == 4096 // (4 * 32) and r["chars"] == 4096 for r in runs)
    assert all(0 < r["val_bpc"] < 8.5 and len(r["curve"]) >= 2 for r in runs)
    # each run really had its own size
    assert [json.loads((tmp_path / r["model_dir"] / "config.json").read_text())["hidden_size"] for r in runs] == [8, 16]
    table = (out / "results.md").read_text()
    assert "| 8 |" in table and "| 16 |" in table and "gap to next smaller" in table
    assert (out / "bpc.png").read_bytes()[:4] == b"\x89PNG"
    assert "[model_size] wrote" in proc.stdout
    again = python(*args, check=True, timeout=300)
    assert again.stdout.count("reusing") == 2 and "training" not in again.stdout
    # An edited config is a new run, not a reused one.
    flagfile.write_text(flagfile.read_text() + "--learning_rate=1e-3\n")
    edited = python(*[a if a != "--hidden_sizes=16,8" else "--hidden_sizes=8" for a in args], check=True, timeout=300)
    assert "hidden 8: training" in edited.stdout and "reusing" not in edited.stdout


def test_bad_sizes_and_a_missing_flagfile_are_one_line(tmp_path):
    for flag, message in [("--hidden_sizes=8,x", "--hidden_sizes must be integers"),
                          ("--hidden_sizes=0", "--hidden_sizes must be positive"),
                          (f"--flagfile_train={tmp_path}/none.cfg", "does not exist")]:
        proc = python("-m", "horovod_mlstm.experiments.model_size", flag, f"--out_dir={tmp_path}/o")
        assert proc.returncode != 0 and message in last_line(proc.stderr), proc.stderr
