"""The byte-level multiplicative LSTM language model (Krause et al. 2016; Radford et al. 2017).

One recurrent layer over bytes:

    m  = (x W_mx) * (h W_mh)                 multiplicative intermediate state
    z  = x W_x + m W_h + b  ->  i, f, o, u   gates, split in that order
    c' = sigmoid(f) * c + sigmoid(i) * tanh(u)
    h' = sigmoid(o) * tanh(c')

W_x, W_h, W_mx and W_mh are weight-normalised (W = g * v / ||v|| per output unit), as in
Radford's and NVIDIA's sentiment-discovery models; the embedding and the softmax layer are not.

Speed comes from doing as little as possible inside the time loop: the weight norm is
computed once per call, the input projections x W_x and x W_mx for all timesteps are one
matmul before the loop, the output projection is one matmul after it, and the loop body is
two matmuls and elementwise math. Matmuls run in the Keras mixed-precision compute dtype;
the cell state, logits and loss stay float32.
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf

VOCAB_SIZE = 256  # bytes


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a saved model; written to MODEL_DIR/config.json so tools can rebuild it."""

    hidden_size: int = 4096
    embed_size: int = 64
    weight_norm: bool = True
    precision: str = "fp32"

    def __post_init__(self):
        if self.hidden_size < 1 or self.embed_size < 1:
            raise ValueError(f"hidden_size and embed_size must be positive, got {self}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")

    def save(self, model_dir: str) -> None:
        tmp = os.path.join(model_dir, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)
        os.replace(tmp, os.path.join(model_dir, "config.json"))

    @classmethod
    def load(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no trained model in {model_dir!r} (missing config.json)")
        with open(path) as f:
            return cls(**json.load(f))


# Keras mixed-precision policy name for each --precision value.
PRECISIONS = {"fp32": "float32", "mixed_float16": "mixed_float16", "mixed_bfloat16": "mixed_bfloat16"}


def set_precision(precision: str) -> None:
    """Sets the global Keras policy; call before building the model."""
    tf.keras.mixed_precision.set_global_policy(PRECISIONS[precision])


def _normalized(v: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """Weight norm: each output column of v rescaled to length g."""
    return tf.nn.l2_normalize(v, axis=0) * g


class MLSTM(tf.keras.layers.Layer):
    """The mLSTM recurrence over a whole [batch, time, embed] sequence.

    call(inputs, (h, c), mask=None) -> (outputs [batch, time, hidden], (h, c)).
    Where `mask[b, t]` is False the state of row b is left unchanged at step t, so the
    returned state is the state after each row's last real timestep (used by transfer).
    """

    def __init__(self, hidden_size: int, weight_norm: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.weight_norm = weight_norm

    def build(self, input_shape):
        n_in, n = int(input_shape[-1]), self.hidden_size
        glorot, orthogonal = tf.keras.initializers.GlorotUniform, tf.keras.initializers.Orthogonal

        def weight(name, shape, initializer):
            # Read in float32 (no autocast): weight norm is computed at full precision and
            # the result is cast to the compute dtype once per call, not per timestep.
            if isinstance(initializer, type):
                initializer = initializer()  # a fresh instance per weight, so each draws anew
            return self.add_weight(name, shape, initializer=initializer, experimental_autocast=False)

        self.wx = weight("wx", [n_in, 4 * n], glorot)
        self.wh = weight("wh", [n, 4 * n], orthogonal)
        self.wmx = weight("wmx", [n_in, n], glorot)
        self.wmh = weight("wmh", [n, n], orthogonal)
        self.b = weight("b", [4 * n], "zeros")
        if self.weight_norm:
            # g starts at ||v|| so the initial effective weights equal the initial v.
            def norm_of(v):
                return lambda shape, dtype=None: tf.norm(v, axis=0)

            self.gx = weight("gx", [4 * n], norm_of(self.wx))
            self.gh = weight("gh", [4 * n], norm_of(self.wh))
            self.gmx = weight("gmx", [n], norm_of(self.wmx))
            self.gmh = weight("gmh", [n], norm_of(self.wmh))
        super().build(input_shape)

    def effective_weights(self):
        """(W_x, W_h, W_mx, W_mh) after weight norm, in float32."""
        ws = (self.wx, self.wh, self.wmx, self.wmh)
        if not self.weight_norm:
            return tuple(tf.convert_to_tensor(w) for w in ws)
        return tuple(_normalized(w, g) for w, g in zip(ws, (self.gx, self.gh, self.gmx, self.gmh)))

    def call(self, inputs, state, mask=None):
        dtype = self.compute_dtype
        n = self.hidden_size
        wx, wh, wmx, wmh = self.effective_weights()
        # All input projections at once: [B, T, E] x [E, 5n] -> [T, B, 5n] (time-major for the loop).
        w_in = tf.cast(tf.concat([wx, wmx], axis=1), dtype)
        proj = tf.einsum("bte,ef->tbf", tf.cast(inputs, dtype), w_in)
        proj = proj + tf.cast(tf.concat([self.b, tf.zeros([n])], 0), dtype)
        wh, wmh = tf.cast(wh, dtype), tf.cast(wmh, dtype)
        h, c = (tf.cast(s, tf.float32) for s in state)
        steps = tf.shape(proj)[0]
        keep = None if mask is None else tf.transpose(tf.cast(mask, tf.bool))  # [T, B]
        outputs = tf.TensorArray(dtype, size=steps)
        for t in tf.range(steps):
            xz, xm = proj[t, :, : 4 * n], proj[t, :, 4 * n :]
            m = xm * tf.matmul(tf.cast(h, dtype), wmh)
            z = tf.cast(xz + tf.matmul(m, wh), tf.float32)
            i, f, o, u = tf.split(z, 4, axis=1)
            c_new = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(u)
            h_new = tf.sigmoid(o) * tf.tanh(c_new)
            if keep is not None:
                k = keep[t][:, None]
                c_new, h_new = tf.where(k, c_new, c), tf.where(k, h_new, h)
            h, c = h_new, c_new
            outputs = outputs.write(t, tf.cast(h, dtype))
        return tf.transpose(outputs.stack(), [1, 0, 2]), (h, c)


class LanguageModel(tf.keras.Model):
    """Byte embedding -> mLSTM -> softmax over the next byte.

    call(bytes [B, T] int, (h, c)) -> (logits [B, T, 256] float32, (h, c) float32).
    """

    def __init__(self, config: ModelConfig):
        super().__init__(name="mlstm_lm")
        self.config = config
        self.embed = tf.keras.layers.Embedding(VOCAB_SIZE, config.embed_size, name="embed")
        self.rnn = MLSTM(config.hidden_size, config.weight_norm, name="mlstm")
        self.out = tf.keras.layers.Dense(VOCAB_SIZE, name="softmax")

    def zero_state(self, batch_size: int):
        z = tf.zeros([batch_size, self.config.hidden_size], tf.float32)
        return z, z

    def call(self, inputs, state, mask=None):
        hidden, state = self.rnn(self.embed(inputs), state, mask=mask)
        # Logits in float32 so the softmax and the loss are computed at full precision.
        return tf.cast(self.out(hidden), tf.float32), state

    def build_for_training(self):
        """Creates every variable with a 1x1 dummy call, so they can be restored and broadcast."""
        self(tf.zeros([1, 1], tf.int32), self.zero_state(1))


def flops_per_char(hidden_size: int, embed_size: int = 64, training: bool = True) -> float:
    """Matmul FLOPs per character (2 per multiply-add); backward counted as 2x forward."""
    n, e = hidden_size, embed_size
    forward = 2 * (e * 5 * n + n * n + n * 4 * n + n * VOCAB_SIZE)
    return 3.0 * forward if training else float(forward)


def build_model(config: ModelConfig) -> LanguageModel:
    set_precision(config.precision)
    model = LanguageModel(config)
    model.build_for_training()
    return model
