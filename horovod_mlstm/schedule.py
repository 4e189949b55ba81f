"""Learning-rate schedule for large-batch training: scaled and capped peak, warmup, decay.

Puri et al. 2018 found that scaling Adam's learning rate linearly with the batch size
diverges for this RNN at a 32k batch; what converges is a peak learning rate that grows
more slowly (or is capped), a warmup, and a decay to zero over a fixed horizon.

    peak = min(base_lr * scale(global_batch / reference_batch), max_lr)
    lr(step) = peak * step / warmup_steps                     while step < warmup_steps
             = peak * decay((step - warmup) / (horizon - warmup))   afterwards

`scale` is 1 (none), r (linear) or sqrt(r) (sqrt); `decay` is linear to zero, cosine,
exponential (to `final_fraction` of the peak at the horizon) or constant.
"""

from __future__ import annotations

import math

import tensorflow as tf

SCALING_RULES = ("none", "linear", "sqrt")
DECAYS = ("linear", "cosine", "exponential", "constant")


def peak_learning_rate(base_lr: float, global_batch: int, reference_batch: int,
                       rule: str = "sqrt", max_lr: float | None = None) -> float:
    """The scaled, capped peak learning rate for a global batch (in sequences)."""
    if rule not in SCALING_RULES:
        raise ValueError(f"batch scaling rule must be one of {SCALING_RULES}, got {rule!r}")
    ratio = global_batch / reference_batch
    scaled = base_lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]
    return min(scaled, max_lr) if max_lr else scaled


class WarmupDecaySchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak_lr`, then decay to the horizon `total_steps`.

    `peak_lr` lives in a tf.Variable so an elastic job can rescale it when the world size
    changes without rebuilding the optimizer.
    """

    def __init__(self, peak_lr: float, warmup_steps: int, total_steps: int,
                 decay: str = "linear", final_fraction: float = 0.01):
        super().__init__()
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
        if warmup_steps < 0 or total_steps < 1 or warmup_steps >= total_steps and decay != "constant":
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
        self.peak_lr = tf.Variable(float(peak_lr), trainable=False, dtype=tf.float32, name="peak_lr")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.decay = decay
        self.final_fraction = float(final_fraction)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = float(max(self.warmup_steps, 1))
        warmup = tf.minimum(1.0, (step + 1.0) / warm) if self.warmup_steps else tf.constant(1.0)
        span = float(max(self.total_steps - self.warmup_steps, 1))
        progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
        if self.decay == "linear":
            factor = 1.0 - progress
        elif self.decay == "cosine":
            factor = 0.5 * (1.0 + tf.cos(math.pi * progress))
        elif self.decay == "exponential":
            factor = tf.pow(self.final_fraction, progress)
        else:
            factor = tf.constant(1.0)
        return self.peak_lr * tf.where(step < self.warmup_steps, warmup, factor)

    def get_config(self):
        return {"peak_lr": float(self.peak_lr.numpy()), "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "decay": self.decay,
                "final_fraction": self.final_fraction}
