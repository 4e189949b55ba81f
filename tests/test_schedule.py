"""Learning-rate schedule values at chosen steps, and the batch-scaling rule."""

import math

import pytest

from horovod_mlstm.schedule import WarmupDecaySchedule, peak_learning_rate

pytestmark = pytest.mark.unit


def lr(schedule, step):
    return float(schedule(step))


def test_warmup_is_linear_then_linear_decay_reaches_zero_at_horizon():
    s = WarmupDecaySchedule(1e-3, warmup_steps=10, total_steps=110, decay="linear")
    assert lr(s, 0) == pytest.approx(1e-4)          # (0 + 1) / 10 of the peak
    assert lr(s, 4) == pytest.approx(5e-4)
    assert lr(s, 9) == pytest.approx(1e-3)
    assert lr(s, 10) == pytest.approx(1e-3)          # decay starts at the peak
    assert lr(s, 60) == pytest.approx(5e-4)          # halfway through the decay
    assert lr(s, 110) == pytest.approx(0.0, abs=1e-12)
    assert lr(s, 500) == pytest.approx(0.0, abs=1e-12)  # stays at zero past the horizon


def test_cosine_exponential_constant():
    cos = WarmupDecaySchedule(2e-3, 0, 100, decay="cosine")
    assert lr(cos, 0) == pytest.approx(2e-3)
    assert lr(cos, 50) == pytest.approx(1e-3)
    assert lr(cos, 100) == pytest.approx(0.0, abs=1e-12)
    exp = WarmupDecaySchedule(1e-3, 0, 100, decay="exponential", final_fraction=0.01)
    assert lr(exp, 50) == pytest.approx(1e-3 * 0.1, rel=1e-4)
    assert lr(exp, 100) == pytest.approx(1e-5, rel=1e-4)
    const = WarmupDecaySchedule(1e-3, 5, 100, decay="constant")
    assert lr(const, 2) == pytest.approx(6e-4)
    assert lr(const, 99) == pytest.approx(1e-3)


def test_peak_learning_rate_scaling_rules_and_cap():
    assert peak_learning_rate(5e-4, 512, 128, "none") == pytest.approx(5e-4)
    assert peak_learning_rate(5e-4, 512, 128, "linear") == pytest.approx(2e-3)
    assert peak_learning_rate(5e-4, 512, 128, "sqrt") == pytest.approx(1e-3)
    # The paper's 32k batch: 32768 / 128 = 256x; linear would be 0.128, sqrt 8e-3, both capped at 3e-3.
    assert peak_learning_rate(5e-4, 32768, 128, "linear", max_lr=3e-3) == pytest.approx(3e-3)
    assert peak_learning_rate(5e-4, 32768, 128, "sqrt") == pytest.approx(5e-4 * math.sqrt(256))


def test_peak_is_a_variable_an_elastic_job_can_rescale():
    s = WarmupDecaySchedule(1e-3, 0, 10, decay="constant")
    s.peak_lr.assign(2e-3)
    assert lr(s, 3) == pytest.approx(2e-3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(decay="step"), "decay must be one of"),
    (dict(warmup_steps=100), "warmup_steps < total_steps"),
])
def test_invalid_schedules_are_rejected(kwargs, message):
    args = dict(peak_lr=1e-3, warmup_steps=10, total_steps=100, decay="linear") | kwargs
    with pytest.raises(ValueError, match=message):
        WarmupDecaySchedule(**args)


def test_unknown_scaling_rule():
    with pytest.raises(ValueError, match="scaling rule"):
        peak_learning_rate(1e-3, 64, 32, "cubic")
