"""The plain Keras mLSTMs the project's step is compared with: the cell a user would write for
tf.keras.layers.RNN, with autodiff through the time loop.

Two variants (BASELINES): with the weight norm recomputed inside every step, as a direct port of
the paper's cell would do it, and without weight norm, the fairer baseline since the project's
weight norm costs once per update.
"""

from __future__ import annotations

import tensorflow as tf

BASELINES = {"weight_norm": True, "no_weight_norm": False}  # plain Keras variant -> weight norm per step


class KerasMLSTMCell(tf.keras.layers.Layer):
    """The mLSTM written the plain way: input projections (and, with weight_norm, the weight norm)
    recomputed inside every step, autodiff backward. Without weight norm it does no per-step work
    the project's step does not also need."""

    def __init__(self, units: int, weight_norm: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.units, self.weight_norm = units, weight_norm
        self.state_size = [units, units]

    def build(self, input_shape):
        n_in, n = int(input_shape[-1]), self.units
        self.wx = self.add_weight("wx", [n_in, 4 * n])
        self.wh = self.add_weight("wh", [n, 4 * n], initializer="orthogonal")
        self.wmx = self.add_weight("wmx", [n_in, n])
        self.wmh = self.add_weight("wmh", [n, n], initializer="orthogonal")
        self.b = self.add_weight("b", [4 * n], initializer="zeros")
        if self.weight_norm:
            self.gs = [self.add_weight(f"g{i}", [k * n], initializer="ones") for i, k in enumerate((4, 4, 1, 1))]

    def call(self, x, states):
        h, c = states
        wx, wh, wmx, wmh = self.wx, self.wh, self.wmx, self.wmh
        if self.weight_norm:
            wx, wh, wmx, wmh = (tf.nn.l2_normalize(w, 0) * g for w, g in zip((wx, wh, wmx, wmh), self.gs))
        m = tf.matmul(x, wmx) * tf.matmul(h, wmh)
        i, f, o, u = tf.split(tf.matmul(x, wx) + tf.matmul(m, wh) + self.b, 4, axis=1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(u)
        h = tf.sigmoid(o) * tf.tanh(c)
        return h, [h, c]


def baseline_model(hidden: int, embed: int, weight_norm: bool) -> tf.keras.Model:
    """Embedding -> RNN(KerasMLSTMCell) -> softmax logits in float32, the project's model's shape."""
    inputs = tf.keras.Input([None], dtype=tf.int32)
    x = tf.keras.layers.Embedding(256, embed)(inputs)
    x = tf.keras.layers.RNN(KerasMLSTMCell(hidden, weight_norm), return_sequences=True)(x)
    logits = tf.keras.layers.Activation("linear", dtype="float32")(tf.keras.layers.Dense(256)(x))
    return tf.keras.Model(inputs, logits)
