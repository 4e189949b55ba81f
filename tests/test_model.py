"""The mLSTM against a plain NumPy transcription of its equations, and a gradient check."""

import numpy as np
import pytest
import tensorflow as tf

from horovod_mlstm.model import ModelConfig, build_model, flops_per_char

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("fused_kernels")]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_lm(model, inputs, h, c):
    """Reference forward pass: embedding -> mLSTM step by step -> softmax layer logits."""
    rnn = model.rnn
    wx, wh, wmx, wmh = (w.numpy() for w in (rnn.wx, rnn.wh, rnn.wmx, rnn.wmh))
    if rnn.weight_norm:
        def wn(v, g):
            return v / np.linalg.norm(v, axis=0, keepdims=True) * g.numpy()
        wx, wh, wmx, wmh = wn(wx, rnn.gx), wn(wh, rnn.gh), wn(wmx, rnn.gmx), wn(wmh, rnn.gmh)
    b = rnn.b.numpy()
    emb = model.embed.embeddings.numpy()[inputs]  # [B, T, E]
    kernel, bias = model.out.kernel.numpy(), model.out.bias.numpy()
    logits = []
    for t in range(inputs.shape[1]):
        x = emb[:, t]
        m = (x @ wmx) * (h @ wmh)
        i, f, o, u = np.split(x @ wx + m @ wh + b, 4, axis=1)
        c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(u)
        h_new = sigmoid(o) * np.tanh(c_new)
        h, c = h_new, c_new
        logits.append(h @ kernel + bias)
    return np.stack(logits, 1), h, c


def random_state(rng, batch, hidden):
    return (rng.normal(size=(batch, hidden)).astype(np.float32) * 0.5,
            rng.normal(size=(batch, hidden)).astype(np.float32) * 0.5)


@pytest.mark.parametrize("weight_norm", [True, False])
def test_forward_matches_numpy_reference(weight_norm):
    tf.keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(hidden_size=24, embed_size=8, weight_norm=weight_norm))
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, size=(3, 7))
    h0, c0 = random_state(rng, 3, 24)
    logits, (h, c) = model(tf.constant(inputs), (h0, c0))
    ref_logits, ref_h, ref_c = numpy_lm(model, inputs, h0, c0)
    np.testing.assert_allclose(logits.numpy(), ref_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h.numpy(), ref_h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c.numpy(), ref_c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_read_equals_the_reference_over_each_rows_own_length(fused):
    """Featurising: each row reads its first lengths[b] bytes, and (h, c, sum, max) are those of exactly
    those bytes, gathered on top of the values passed in (a text read in pieces)."""
    tf.keras.utils.set_random_seed(1)
    model = build_model(ModelConfig(hidden_size=16, embed_size=8))
    rng = np.random.default_rng(1)
    inputs = rng.integers(0, 256, size=(3, 6))
    lengths = np.array([6, 3, 1])
    h0, c0 = random_state(rng, 3, 16)
    total0, peak0 = random_state(rng, 3, 16)
    w_in, wh, wmh = model.rnn.compute_weights()
    h, c, total, peak = model.rnn.read(model.byte_projections(w_in), inputs.T, h0, c0, total0, peak0, lengths, wh,
                                       wmh, fused=fused)
    for row, length in enumerate(lengths):
        ref_h, ref_c, hs = h0[row:row + 1], c0[row:row + 1], []
        for t in range(length):
            _, ref_h, ref_c = numpy_lm(model, inputs[row:row + 1, t:t + 1], ref_h, ref_c)
            hs.append(ref_h[0])
        np.testing.assert_allclose(h.numpy()[row], ref_h[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(c.numpy()[row], ref_c[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(total.numpy()[row], total0[row] + np.sum(hs, 0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(peak.numpy()[row], np.max([peak0[row], *hs], 0), rtol=1e-4, atol=1e-5)


def test_gradients_match_finite_differences():
    tf.keras.utils.set_random_seed(2)
    model = build_model(ModelConfig(hidden_size=8, embed_size=4))
    rng = np.random.default_rng(2)
    inputs = tf.constant(rng.integers(0, 256, size=(2, 5)))
    targets = tf.constant(rng.integers(0, 256, size=(2, 5)))
    state = model.zero_state(2)

    def loss_fn():
        logits, _ = model(inputs, state)
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits))

    with tf.GradientTape() as tape:
        loss = loss_fn()
    grads = tape.gradient(loss, model.trainable_variables)
    for var, grad in zip(model.trainable_variables, grads):
        grad = tf.convert_to_tensor(grad).numpy()  # embedding gradients arrive as IndexedSlices
        flat = var.numpy().reshape(-1)
        for idx in rng.choice(flat.size, size=min(3, flat.size), replace=False):
            if grad.reshape(-1)[idx] == 0.0 and "embed" in var.name:
                continue  # rows of bytes that do not occur
            eps = 1e-3
            orig = flat[idx]
            for sign in (1, -1):
                flat[idx] = orig + sign * eps
                var.assign(flat.reshape(var.shape))
                if sign == 1:
                    up = float(loss_fn())
                else:
                    down = float(loss_fn())
            flat[idx] = orig
            var.assign(flat.reshape(var.shape))
            numeric = (up - down) / (2 * eps)
            assert abs(numeric - grad.reshape(-1)[idx]) < 2e-3 + 2e-2 * abs(numeric), var.name


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_float32_weights_and_logits(precision):
    tf.keras.utils.set_random_seed(3)
    model = build_model(ModelConfig(hidden_size=16, embed_size=8, precision=precision))
    try:
        assert all(v.dtype == tf.float32 for v in model.trainable_variables)
        logits, (h, c) = model(tf.zeros([2, 4], tf.int32), model.zero_state(2))
        assert logits.dtype == tf.float32 and c.dtype == tf.float32
        assert np.isfinite(logits.numpy()).all()
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_flops_per_char_of_the_paper_model():
    # 4096 units: ~2 * (4096*4096*5) multiply-adds per char forward; training triples it.
    assert 5.0e8 < flops_per_char(4096) < 6.5e8
    assert flops_per_char(4096) == 3 * flops_per_char(4096, training=False)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="precision"):
        ModelConfig(precision="fp8")


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("use_final_state", [False, True])
def test_hand_written_backward_equals_autodiff(use_final_state, fused):
    """recurrence()'s custom gradient, with TensorFlow's gate math or the fused kernels, against TF
    autodiff through the forward loop of TensorFlow ops."""
    from horovod_mlstm.model import _forward, recurrence

    rng = np.random.default_rng(4)
    T, B, n = 6, 3, 5
    proj = tf.constant(rng.normal(size=(T, B, 5 * n)), tf.float32)
    h0, c0 = (tf.constant(rng.normal(size=(B, n)), tf.float32) for _ in range(2))
    wh = tf.constant(rng.normal(size=(n, 4 * n)) * 0.5, tf.float32)
    wmh = tf.constant(rng.normal(size=(n, n)) * 0.5, tf.float32)
    weights = [tf.constant(rng.normal(size=s), tf.float32) for s in [(T, B, n), (B, n), (B, n)]]

    def loss(outputs):
        hs, h, c = outputs[:3]
        total = tf.reduce_sum(hs * weights[0])
        return total + tf.reduce_sum(h * weights[1]) + tf.reduce_sum(c * weights[2]) if use_final_state else total

    args = [proj, h0, c0, wh, wmh]
    with tf.GradientTape() as tape:
        tape.watch(args)
        custom = loss(recurrence(fused)(*args))
    with tf.GradientTape() as tape2:
        tape2.watch(args)
        reference = loss(_forward(*args))
    np.testing.assert_allclose(custom.numpy(), reference.numpy(), rtol=1e-6)
    for got, want in zip(tape.gradient(custom, args), tape2.gradient(reference, args)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
