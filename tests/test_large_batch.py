"""The large-batch experiment: divergence detection, and an end-to-end tiny run with its report."""

import json

from conftest import python
from horovod_mlstm.experiments.large_batch import diverged


def test_divergence_detection():
    assert diverged([{"val_bpc": 7.9}, {"val_bpc": 5.0}]) is False
    assert diverged([{"val_bpc": 7.9}, {"val_bpc": float("nan")}]) is True
    assert diverged([{"val_bpc": 6.0}, {"val_bpc": 4.0}, {"val_bpc": 6.5}]) is True
    assert diverged([{"val_bpc": 9.5}, {"val_bpc": 9.0}]) is True  # worse than a uniform guess
    assert diverged([]) is True


def test_tiny_experiment_marks_a_planted_exploding_lr(tmp_path, tiny_data):
    out = tmp_path / "lb"
    proc = python("-m", "horovod_mlstm.experiments.large_batch", f"--out_dir={out}", f"--data_dir={tiny_data}",
                  "--batches=4,16", "--policies=linear,schedule", "--chars=20000", "--hidden_size=16",
                  "--seq_length=16", "--micro_batch=4", "--learning_rate=50", "--reference_batch=4",
                  "--max_learning_rate=3e-3", "--evals=3", "--eval_windows=2", check=True, timeout=600)
    results = {(r["batch"], r["policy"]): r for r in json.loads((out / "results.json").read_text())}
    assert set(results) == {(4, "linear"), (4, "schedule"), (16, "linear"), (16, "schedule")}
    assert results[16, "linear"]["peak_lr"] == 200.0        # 50 x 16/4, uncapped
    assert results[16, "schedule"]["peak_lr"] == 3e-3       # sqrt-scaled, then capped
    assert results[16, "linear"]["diverged"] and not results[16, "schedule"]["diverged"]
    assert results[16, "linear"]["steps"] == 20000 // (16 * 16)
    table = (out / "results.md").read_text()
    assert "| 16 | linear |" in table and "**yes**" in table
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "[large_batch] wrote" in proc.stdout
