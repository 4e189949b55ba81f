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
matmul before the loop, the output projection is one matmul after it, the loop body is
two matmuls and elementwise math, and the backward pass is written by hand so that the
recurrent weight gradients are two large matmuls after the reverse loop (see recurrence). On CPU
the elementwise math of a step, and of its gradient, is one fused kernel each (kernels.py).
Matmuls run in the Keras mixed-precision compute dtype; the cell state, logits and loss stay
float32.
"""

from __future__ import annotations

import dataclasses
import functools

import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # XLA context test (no public API in TF 2.15)

from horovod_mlstm import kernels

VOCAB_SIZE = 256  # bytes


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a model; a model dir keeps it as config.json (modeldir.py) so tools can rebuild it."""

    hidden_size: int = 4096
    embed_size: int = 64
    weight_norm: bool = True
    precision: str = "fp32"

    def __post_init__(self):
        if self.hidden_size < 1 or self.embed_size < 1:
            raise ValueError(f"hidden_size and embed_size must be positive, got {self}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")


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

    call(inputs, (h, c), fused=None) -> (outputs [batch, time, hidden], (h, c)): training and evaluation.
    read(proj, h, c, total, peak, lengths, wh, wmh) -> (h, c, total, peak): featurising, forward only.
    fused: the gate math as the fused CPU kernels; None uses them wherever they are built and
    usable. A graph to be saved passes False, so that it loads without the kernels' library.
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

    def compute_weights(self):
        """(W_in, W_h, W_mh) in the compute dtype, W_in = [[W_x, W_mx], [b, 0]]: the input projection
        with the bias as its last row (see _project)."""
        wx, wh, wmx, wmh = self.effective_weights()
        w_in = tf.concat([tf.concat([wx, wmx], axis=1), tf.concat([self.b, tf.zeros([self.hidden_size])], 0)[None]],
                         axis=0)
        return tuple(tf.cast(w, self.compute_dtype) for w in (w_in, wh, wmh))

    def _project(self, inputs, w_in):
        """All input projections at once, time-major for the loop: [T*B, E+1] x [E+1, 5n] -> [T, B, 5n].
        The bias rides as a last row against a ones column, so its gradient comes out of the same matmul
        (a separate add and sum over [T, B, 5n] in bf16 cost 3% of a hidden-1024 update)."""
        x = tf.transpose(tf.cast(inputs, w_in.dtype), [1, 0, 2])
        steps, batch = tf.shape(x)[0], tf.shape(x)[1]
        x = tf.concat([x, tf.ones([steps, batch, 1], w_in.dtype)], axis=2)
        proj = tf.matmul(tf.reshape(x, [steps * batch, w_in.shape[0]]), w_in)
        return tf.reshape(proj, [steps, batch, 5 * self.hidden_size])

    def _fused(self, fused):
        if fused is None:
            # The fused kernels are CPU ops without an XLA kernel: under --xla the gate math is TensorFlow's.
            return kernels.available() and not control_flow_util.GraphOrParentsInXlaContext(
                tf.compat.v1.get_default_graph())
        return fused

    def call(self, inputs, state, fused=None):
        w_in, wh, wmh = self.compute_weights()
        h, c = (tf.cast(s, tf.float32) for s in state)
        hs, h, c = recurrence(self._fused(fused))(self._project(inputs, w_in), h, c, wh, wmh)
        return tf.transpose(hs, [1, 0, 2]), (h, c)

    def read(self, table, ids, h, c, total, peak, lengths, wh, wmh, fused=None):
        """Featurising: the recurrence forward only, keeping no per-step output, (h, c, total, peak) after it.

        ids [time, batch] int32: the bytes read, time-major; table [256, 5n]: each byte's input
        projections, bias included (LanguageModel.byte_projections), looked up at each step; wh, wmh:
        compute_weights()' last two. Row b reads its first lengths[b] steps; its state is then left
        as it is, so h and c are the state after its last byte. total and peak [batch, hidden]
        gather the sum and elementwise maximum of its hidden states (as the next matmul reads them,
        in the compute dtype) on top of the values passed in, so a text can be read in pieces.
        """
        return _read(table, tf.cast(ids, tf.int32), h, c, total, peak, tf.cast(lengths, tf.int32), wh, wmh,
                     fused=self._fused(fused))


def _gates(xz, mz, c, fused):
    """One step's gate math: (saved, c_new, h_new) in float32 and h_new in xz's dtype.

    xz: the step's input projections [B, 4n + k]; the gates use the first 4n columns.

    saved [B, 6n] is what the backward step reads: i, f, o, u, c and tanh(c_new), one tensor so the
    loop writes (and the reverse loop reads) one array per step instead of six.
    """
    if fused:
        return kernels.gates(xz, mz, c)
    i, f, o, u, c_new, tanh_c = _cell(xz, mz, c)
    h_new = o * tanh_c
    return tf.concat([i, f, o, u, c, tanh_c], axis=1), c_new, h_new, tf.cast(h_new, xz.dtype)


def _cell(xz, mz, c):
    """The gate math in TensorFlow ops: (i, f, o, u, c_new, tanh(c_new)), float32."""
    z = tf.cast(xz[:, :mz.shape[1]], tf.float32) + tf.cast(mz, tf.float32)  # added in float32, as the kernel does
    i, f, o, u = tf.split(z, 4, axis=1)
    i, f, o, u = tf.sigmoid(i), tf.sigmoid(f), tf.sigmoid(o), tf.tanh(u)
    c_new = f * c + i * u
    return i, f, o, u, c_new, tf.tanh(c_new)


def _read_gates(table, ids, mz, c, h, total, peak, lengths, t, fused):
    """One featurising step's gate math, the step's input projections the rows IDS of TABLE: (c, h, h in
    mz's dtype, total, peak), rows with t >= lengths unchanged (MLSTM.read)."""
    if fused:
        return kernels.read(table, ids, mz, c, h, total, peak, lengths, t)
    _, _, o, _, c_new, tanh_c = _cell(tf.gather(table, ids), mz, c)
    keep = (t < lengths)[:, None]
    c, h = tf.where(keep, c_new, c), tf.where(keep, o * tanh_c, h)
    h_compute = tf.cast(h, mz.dtype)
    value = tf.cast(h_compute, tf.float32)
    return c, h, h_compute, tf.where(keep, total + value, total), tf.where(keep, tf.maximum(peak, value), peak)


def _gates_grad(d_h, d_hs, d_c, saved, fused):
    """Gradient through one step's gate math: (d_z [B, 4n] in d_h's dtype, d_c for step t-1).

    d_h comes from step t+1 through the recurrent matmul, in the compute dtype; d_hs from this
    step's output; saved is _gates' first output for this step.
    """
    if fused:
        return kernels.gates_grad(d_h, d_hs, d_c, saved)
    i, f, o, u, c_prev, tanh_c = tf.split(saved, 6, axis=1)
    d_h_total = tf.cast(d_h, tf.float32) + d_hs
    d_c = d_c + d_h_total * o * (1.0 - tanh_c * tanh_c)
    d_z = tf.concat([d_c * u * i * (1.0 - i), d_c * c_prev * f * (1.0 - f),
                     d_h_total * tanh_c * o * (1.0 - o), d_c * i * (1.0 - u * u)], axis=1)
    return tf.cast(d_z, d_h.dtype), d_c * f


@tf.function  # compiled with autograph: the loops run as tf.while_loop, also inside custom_gradient
def _forward(proj, h, c, wh, wmh, save=False, fused=False):
    """The recurrence over time-major projections [T, B, 5n]: hs [T, B, n] and the final (h, c).

    With save=True also returns what the backward pass needs that it cannot recompute in one op
    after the loop: x_m and h_{t-1} W_mh stacked [T, B, n] (compute dtype), and _gates' saved values
    [B, 6n] (float32) as the TensorArray's list, unstacked: the reverse loop reads them one step at
    a time, so stacking them would only copy them. The loop body is the two matmuls, the gate
    math and three array writes: each step's projections are views of proj (no per-step slicing
    copy); h_{t-1} is hs shifted by one and m is x_m * h_{t-1} W_mh, so neither is written per
    step. fused: the gate math as one kernel (kernels.py; no autodiff).
    """
    dtype, n = wh.dtype, wh.shape[0]
    steps = tf.shape(proj)[0]
    xm_all = tf.split(proj, [4 * n, n], axis=2)[1]  # contiguous, so each step's slice is a view
    hs = tf.TensorArray(dtype, size=steps)
    kept = [tf.TensorArray(dtype, size=steps), tf.TensorArray(tf.float32, size=steps)] if save else []
    h_in = tf.cast(h, dtype)
    for t in tf.range(steps):
        hm = tf.matmul(h_in, wmh)
        m = xm_all[t] * hm
        saved, c_new, h_new, h_new_in = _gates(proj[t], tf.matmul(m, wh), c, fused)
        if save:
            kept = [kept[0].write(t, hm), kept[1].write(t, saved)]
        h, c, h_in = h_new, c_new, h_new_in
        hs = hs.write(t, h_in)
    return hs.stack(), h, c, ({"xm": xm_all, "hm": kept[0].stack(), "gates": kept[1].flow} if save else {})


@tf.function
def _read(table, ids, h, c, total, peak, lengths, wh, wmh, fused=False):
    """MLSTM.read's loop: _forward's two matmuls per step, x_m and the gate inputs looked up in the byte
    table, then the gate math with the running sum and maximum (_read_gates), nothing written per step."""
    xm_table = table[:, 4 * wh.shape[0]:]
    h_in = tf.cast(h, wh.dtype)
    for t in tf.range(tf.shape(ids)[0]):
        step_ids = ids[t]
        mz = tf.matmul(tf.gather(xm_table, step_ids) * tf.matmul(h_in, wmh), wh)
        c, h, h_in, total, peak = _read_gates(table, step_ids, mz, c, h, total, peak, lengths, t, fused)
    return h, c, total, peak


@functools.lru_cache(maxsize=None)
def recurrence(fused: bool):
    """recurrence(fused)(proj, h0, c0, wh, wmh) -> (hs, h, c): the recurrence with a hand-written backward.

    Autodiff through the time loop accumulates the weight gradients step by step (a rank-B
    update of a [n, 4n] matrix per step). Here the reverse loop computes only the per-step
    gate and state gradients; the weight gradients are then two large matmuls over all
    T*B rows at once, which run near the machine's matmul rate. fused: the gate math and its
    gradient as the kernels of kernels.py.
    """
    @tf.custom_gradient
    def run(proj, h0, c0, wh, wmh):
        hs, h, c, saved = _forward(proj, h0, c0, wh, wmh, save=True, fused=fused)

        def backward(d_hs, d_h, d_c):
            d_hs = tf.cast(d_hs, tf.float32)
            if d_h is not None:
                # The gate gradient adds d_h (from step t+1) to d_hs (from step t's output) first, so
                # the final state's gradient joins the last step's d_hs, and the reverse loop's d_h
                # starts at zero in the matmul's output dtype (no cast per step). Training carries
                # the state without a gradient, so this copy is for evaluation and tests only.
                d_hs = tf.concat([d_hs[:-1], d_hs[-1:] + tf.cast(d_h, tf.float32)[None]], axis=0)
            d_c = tf.zeros_like(c0) if d_c is None else tf.cast(d_c, tf.float32)
            return _backward(proj, h0, hs, wh, wmh, saved, d_hs, d_c, fused=fused)

        return (hs, h, c), backward

    return run


@tf.function
def _backward(proj, h0, hs, wh, wmh, saved, d_hs, d_c, fused=False):
    """Reverse loop of recurrence(): gradients for (proj, h0, c0, wh, wmh).

    Per step: the gate gradient, d_m = d_z W_h^T, d_hm = d_m * x_m and d_h = d_hm W_mh^T. What the
    recurrence does not need (d_xm, and d_hm for the weight gradient) is recomputed from d_m after
    the loop, in one op each over all steps.
    """
    dtype, n = wh.dtype, wh.shape[0]
    steps = tf.shape(proj)[0]
    # The loop multiplies by W_h^T and W_mh^T. oneDNN's float32 matmul with a transposed operand ran
    # at a third of its plain rate here (docs/PERFORMANCE.md), its bfloat16 one at full rate: float32
    # transposes the two weights once per call instead.
    transpose_b = dtype != tf.float32
    wh_t, wmh_t = (wh, wmh) if transpose_b else (tf.transpose(wh), tf.transpose(wmh))
    xm_all = saved["xm"]
    d_h = tf.zeros_like(d_c, dtype)

    def read_gates(t):  # step t of the forward's unstacked array of saved gate values
        return tf.raw_ops.TensorListGetItem(input_handle=saved["gates"], index=t, element_shape=[-1, 6 * n],
                                            element_dtype=tf.float32)

    d_z_all = tf.TensorArray(dtype, size=steps)
    d_m_all = tf.TensorArray(dtype, size=steps)
    for t in tf.range(steps - 1, -1, -1):
        d_z, d_c_prev = _gates_grad(d_h, d_hs[t], d_c, read_gates(t), fused)
        d_m = tf.matmul(d_z, wh_t, transpose_b=transpose_b)
        d_z_all, d_m_all = d_z_all.write(t, d_z), d_m_all.write(t, d_m)
        d_h = tf.matmul(d_m * xm_all[t], wmh_t, transpose_b=transpose_b)
        d_c = d_c_prev
    d_z, d_m, hm = d_z_all.stack(), d_m_all.stack(), saved["hm"]
    d_proj = tf.concat([d_z, d_m * hm], axis=2)
    # Weight gradients over all T*B rows: one plain 2-D matmul each (einsum's batched form was slower).
    h_prev = tf.concat([tf.cast(h0, dtype)[None], hs[:-1]], axis=0)
    d_wh = tf.matmul(tf.reshape(xm_all * hm, [-1, n]), tf.reshape(d_z, [-1, 4 * n]), transpose_a=True)
    d_wmh = tf.matmul(tf.reshape(h_prev, [-1, n]), tf.reshape(d_m * xm_all, [-1, n]), transpose_a=True)
    return d_proj, tf.cast(d_h, tf.float32), d_c, d_wh, d_wmh


def activation_bytes(hidden_size: int, streams: int, seq_length: int, precision: str, embed_size: int = 64) -> dict:
    """Estimated peak bytes of the per-timestep tensors of one training update: the larger of two moments.

    d is the compute dtype's size (2 or 4); a [T, B, k*n] tensor holds k*n values per stream and byte.
    Both moments hold what recurrence() keeps from _forward(save=True) for _backward: x_m, hm and hs
    [T, B, n] (d) and the gate values [B, 6n] of every step (float32); and the embedded bytes with
    the ones column [T, B, embed + 1] (d), kept for the input projection's weight gradient.
    - forward_end, as the loss is computed: also the projections proj [T, B, 5n] (d; after this only
      their shape is read), the layer's output [B, T, n] (d) that the softmax layer keeps for its
      weight gradient, and the logits [B, T, 256] in float32 with the loss's gradient of them (float32).
    - reverse_loop_end, as _backward's loop ends: also d_hs [T, B, n] (float32), which the loop reads
      step by step, and the arrays it fills, d_z [T, B, 4n] and d_m [T, B, n] (d).
    Weights, Adam and the parameter-sized working set are counted elsewhere (bench.capacity).
    tests/test_bench.py holds this against the allocator's measured peak in a fresh process.
    """
    d = tf.as_dtype(tf.keras.mixed_precision.Policy(PRECISIONS[precision]).compute_dtype).size
    cells, positions = streams * seq_length * hidden_size, streams * seq_length
    kept = cells * (3 * d + 6 * 4) + positions * (embed_size + 1) * d
    moments = {"forward_end": kept + cells * 6 * d + positions * VOCAB_SIZE * 2 * 4,
               "reverse_loop_end": kept + cells * (4 + 5 * d)}
    return {**moments, "total": max(moments.values())}


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

    def call(self, inputs, state):
        hidden, state = self.rnn(self.embed(inputs), state)
        # Logits in float32 so the softmax and the loss are computed at full precision.
        return tf.cast(self.out(hidden), tf.float32), state

    def byte_projections(self, w_in):
        """[256, 5n]: every byte's input projection, bias included, in the compute dtype (w_in:
        MLSTM.compute_weights()[0]). Featurising looks its bytes up here instead of multiplying per
        piece, so a byte's projection never depends on the shape of the piece it is read in (a large
        matmul blocks, and so rounds, differently from a small one)."""
        return self.rnn._project(self.embed(tf.range(VOCAB_SIZE)[None]), w_in)[:, 0]

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
