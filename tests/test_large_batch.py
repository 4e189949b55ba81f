"""The large-batch experiment: policies, run outcomes, and an end-to-end tiny run with a planted exploding LR."""

import json
import math

import pytest

from conftest import last_line, python
from horovod_mlstm.experiments.large_batch import outcome, peak_lr


def curve(*values):
    return [{"val_bpc": v} for v in values]


@pytest.mark.unit
def test_outcomes():
    assert outcome(curve(7.5, 5.0, 4.0), spike_bits=0.5) == "stable"
    assert outcome(curve(7.5, float("nan")), spike_bits=0.5) == "diverged"
    assert outcome(curve(6.0, 9.5, 4.0), spike_bits=0.5) == "diverged"     # rose above the untrained 8 bits
    assert outcome(curve(57.8, 28.2, 6.9), spike_bits=0.5) == "diverged"   # ... even if it recovered later
    assert outcome([], spike_bits=0.5) == "diverged"
    assert outcome(curve(5.0, 4.0, 4.8, 4.2), spike_bits=0.5) == "unstable"  # rose 0.8 above its best
    assert outcome(curve(6.0, 4.0, 6.5), spike_bits=0.5) == "unstable"
    assert outcome(curve(5.0, 4.0, 4.3, 3.9), spike_bits=0.5) == "stable"    # a rise within the tolerance


@pytest.mark.unit
def test_peak_learning_rates():
    assert peak_lr("linear", 0.01, 1024, 16, 1.5) == pytest.approx(0.64)
    assert peak_lr("sqrt", 0.01, 1024, 16, 1.5) == pytest.approx(0.08)
    assert peak_lr("schedule", 0.01, 1024, 16, 1.5) == pytest.approx(0.015)  # capped
    assert peak_lr("schedule", 0.01, 32, 16, 1.5) == pytest.approx(0.01 * math.sqrt(2))  # below the cap
    assert peak_lr("none", 0.01, 1024, 16, 1.5) == 0.01
    assert peak_lr("adasum", 0.01, 1024, 16, 1.5) == 0.01  # Adasum needs no scaling with the ranks


@pytest.mark.cli
def test_tiny_experiment_tunes_past_a_planted_exploding_lr(tmp_path, tiny_data):
    out = tmp_path / "lb"
    args = ["-m", "horovod_mlstm.experiments.large_batch", f"--out_dir={out}", f"--data_dir={tiny_data}",
            "--batches=4,16", "--policies=linear,schedule", "--base_lrs=3e-3,100,1e39", "--reference_batch=4",
            "--chars=16384", "--hidden_size=16", "--seq_length=16", "--micro_batch=4", "--evals=3",
            "--eval_streams=4", "--eval_windows=2", "--threads=1", "--precision=fp32"]
    proc = python(*args, check=True, timeout=900)
    report = json.loads((out / "results.json").read_text())
    tuning = {r["peak_lr"]: r for r in report["tuning"]}
    assert tuning[100.0]["outcome"] == "diverged" and tuning[3e-3]["outcome"] != "diverged"
    # 1e39 is inf in float32: the weights become non-finite and train.py exits rather than checkpoint
    # them. The experiment records that as diverged, with the curve the job logged, not as a failure; its
    # NaN BPC is null in results.json (strict JSON) and nan in results.md.
    assert tuning[1e39]["outcome"] == "diverged" and tuning[1e39]["final_bpc"] is None
    assert "the weights became non-finite (diverged)" in proc.stdout
    assert len(list(out.glob("*/nonfinite.json"))) == 1
    assert report["base_lr"] == 3e-3
    runs = {(r["batch"], r["policy"]): r for r in report["runs"]}
    assert set(runs) == {(4, "linear"), (4, "schedule"), (16, "linear"), (16, "schedule")}
    assert runs[16, "linear"]["peak_lr"] == pytest.approx(0.012)      # 3e-3 x 16/4
    assert runs[16, "schedule"]["peak_lr"] == pytest.approx(4.5e-3)   # 3e-3 x sqrt(4) = 6e-3, capped at 1.5 x base
    assert runs[16, "linear"]["steps"] == 16384 // (16 * 16)
    # At the reference batch, linear is the tuning run of the base LR: trained once, shared.
    assert runs[4, "linear"]["curve"] == tuning[3e-3]["curve"]
    assert len([d for d in out.iterdir() if d.is_dir()]) == 6
    table = (out / "results.md").read_text()
    assert "**diverged**" in table and "| 16 | linear | 0.012 |" in table and "tuned at the reference batch" in table
    assert "| 1e+39 | nan | nan | **diverged** |" in table
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "[large_batch] wrote" in proc.stdout
    # Run again: every run is reused, none is trained twice.
    again = python(*args, check=True, timeout=300)
    assert "[large_batch] training" not in again.stdout and "[large_batch] wrote" in again.stdout



@pytest.mark.multiproc
def test_adasum_policy_trains_on_two_mpi_ranks_at_the_base_lr(tmp_path, tiny_data):
    """The adasum run is train.py --gradient_reduction=adasum under horovodrun --mpi (Gloo would refuse it),
    at the tuned base LR with a linear decay; its averaging twin is schedule at cap 1x."""
    out = tmp_path / "lb"
    python("-m", "horovod_mlstm.experiments.large_batch", f"--out_dir={out}", f"--data_dir={tiny_data}",
           "--batches=8", "--policies=adasum", "--base_lrs=3e-3", "--reference_batch=8", "--chars=4096",
           "--hidden_size=16", "--seq_length=16", "--micro_batch=4", "--evals=2", "--eval_streams=4",
           "--eval_windows=2", "--threads=1", "--np=2", "--parallel=1", "--precision=fp32", check=True, timeout=600)
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["policy"] == "adasum" and run["peak_lr"] == 3e-3 and run["outcome"] != "diverged"
    (adasum_dir,) = out.glob("b8_lr0.003_linear_adasum_*")
    summary = json.loads((adasum_dir / "summary.json").read_text())
    # a real 2-rank MPI training run with Adasum (test_distributed checks the combination's values)
    assert summary["gradient_reduction"] == "adasum" and summary["world_size"] == 2
    assert summary["replicas_in_sync"] is True and summary["final_step"] == run["steps"]
    assert 0 < summary["val_bpc"] < 9


@pytest.mark.cli
@pytest.mark.parametrize("flag, message", [
    ("--policies=linear,cubic", "--policies must be some of"),
    ("--policies=", "--policies must be some of"),
    ("--base_lrs=fast", "--base_lrs and --cap_multiples numbers"),
    ("--cap_multiples=0", "must be positive"),
    ("--batches=0", "must be positive"),
    ("--batches=100", "batch 100 does not split into 1 process(es) x micro-batches of 64"),
    ("--policies=schedule,adasum", "--policies=adasum needs --np of 2, 4, 8, ... (Adasum combines the gradients of "
     "several ranks, a power-of-2 number of them in Horovod), got --np 1"),
    ("--policies=adasum --np=3", "--policies=adasum needs --np of 2, 4, 8, ..."),
])
def test_bad_flags_are_one_line_before_any_training(tmp_path, flag, message):
    proc = python("-m", "horovod_mlstm.experiments.large_batch", f"--out_dir={tmp_path}", "--micro_batch=64",
                  *flag.split(" "), timeout=120)
    assert proc.returncode != 0 and message in last_line(proc.stderr)
    assert "[large_batch] training" not in proc.stdout
