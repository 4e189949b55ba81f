"""The fused gate kernels (kernels.cc) against the same math in TensorFlow ops, and when the model uses them."""

import numpy as np
import pytest
import tensorflow as tf

from horovod_mlstm import kernels
from horovod_mlstm.model import ModelConfig, _gates, _gates_grad, _read_gates, build_model

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("fused_kernels")]

B, N = 5, 12
TOLERANCE = {tf.float32: 1e-6, tf.float16: 1e-3, tf.bfloat16: 1e-2}  # for values rounded to the dtype


def random(rng, shape, dtype=tf.float32, scale=1.0):
    return tf.cast(tf.constant(rng.normal(size=shape) * scale, tf.float32), dtype)


@pytest.mark.parametrize("width", [4 * N, 5 * N])  # the model passes whole projection rows, x_m included
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16])
def test_fused_gates_equal_tensorflow_ops(dtype, width):
    rng = np.random.default_rng(0)
    xz, mz, c = random(rng, (B, width), dtype, 2.0), random(rng, (B, 4 * N), dtype, 2.0), random(rng, (B, N))
    fused, plain = _gates(xz, mz, c, fused=True), _gates(xz, mz, c, fused=False)
    assert fused[-1].dtype == plain[-1].dtype == dtype and all(t.dtype == tf.float32 for t in fused[:-1])
    assert fused[0].shape == (B, 6 * N) and all(t.shape == (B, N) for t in fused[1:])
    for got, want in zip(fused[:-1], plain[:-1]):  # both add the pre-activations in float32
        np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(tf.cast(fused[-1], tf.float32), tf.cast(plain[-1], tf.float32), atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16])
def test_fused_gate_gradient_equals_tensorflow_ops(dtype):
    rng = np.random.default_rng(1)
    d_h, d_hs, d_c, c_prev = random(rng, (B, N), dtype), random(rng, (B, N)), random(rng, (B, N)), random(rng, (B, N))
    i, f, o, u = tf.sigmoid(random(rng, (B, N))), tf.sigmoid(random(rng, (B, N))), \
        tf.sigmoid(random(rng, (B, N))), tf.tanh(random(rng, (B, N)))
    saved = tf.concat([i, f, o, u, c_prev, tf.tanh(random(rng, (B, N)))], axis=1)
    args = (d_h, d_hs, d_c, saved)
    (d_z, d_c_prev), (want_z, want_c) = _gates_grad(*args, fused=True), _gates_grad(*args, fused=False)
    assert d_z.dtype == dtype and d_z.shape == (B, 4 * N)
    np.testing.assert_allclose(tf.cast(d_z, tf.float32), tf.cast(want_z, tf.float32), rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype])
    np.testing.assert_allclose(d_c_prev, want_c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16])
def test_fused_featurising_step_equals_tensorflow_ops(dtype):
    """The featurising kernel: rows with t < lengths step and gather their hidden state into the sum and
    maximum; the others come out exactly as they went in."""
    rng = np.random.default_rng(2)
    table, mz = random(rng, (7, 5 * N), dtype, 2.0), random(rng, (B, 4 * N), dtype, 2.0)
    ids = tf.constant([6, 0, 2, 6, 1], tf.int32)  # a row of the table for each row of the batch, one twice
    c, h, total, peak = (random(rng, (B, N)) for _ in range(4))
    lengths, t = tf.constant([0, 3, 4, 9, 3], tf.int32), tf.constant(3, tf.int32)
    args = (table, ids, mz, c, h, total, peak, lengths, t)
    fused, plain = _read_gates(*args, fused=True), _read_gates(*args, fused=False)
    assert fused[2].dtype == dtype and all(x.dtype == tf.float32 and x.shape == (B, N) for i, x in enumerate(fused)
                                           if i != 2)
    for got, want in zip(fused, plain):
        np.testing.assert_allclose(tf.cast(got, tf.float32), tf.cast(want, tf.float32), atol=TOLERANCE[dtype])
    stepped = np.array([False, False, True, True, False])
    for got, before in zip((fused[0], fused[1], fused[3], fused[4]), (c, h, total, peak)):
        np.testing.assert_array_equal(got.numpy()[~stepped], before.numpy()[~stepped])
    for got, before in zip((fused[0], fused[1], fused[3]), (c, h, total)):
        assert not np.isclose(got.numpy()[stepped], before.numpy()[stepped]).all(axis=1).any()  # each row moved
    value = tf.cast(fused[2], tf.float32).numpy()[stepped]
    np.testing.assert_array_equal(fused[4].numpy()[stepped], np.maximum(peak.numpy()[stepped], value))


def test_wrong_shapes_are_an_error_naming_them():
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"xz must be \[2, >= 16\] and mz \[2, 16\]"):
        kernels.gates(tf.zeros([2, 15]), tf.zeros([2, 16]), tf.zeros([2, 4]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"input 3 must be \[2, 24\]"):
        kernels.gates_grad(*[tf.zeros([2, 4])] * 3, tf.zeros([2, 20]))
    read_args = [tf.zeros([3, 20]), tf.zeros([2], tf.int32), tf.zeros([2, 16]), *[tf.zeros([2, 4])] * 4,
                 tf.zeros([2], tf.int32), 0]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"lengths must be \[2\]"):
        kernels.read(*read_args[:7], tf.zeros([3], tf.int32), 0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"ids\[1\] = 3 is not a row of the table \[0, 3\)"):
        kernels.read(read_args[0], tf.constant([0, 3]), *read_args[2:])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"table must be \[bytes, >= 16\]"):
        kernels.read(tf.zeros([3, 15]), *read_args[1:])
    vector = tf.TensorSpec([4], tf.float32)  # caught when a graph is built, before any kernel runs
    with pytest.raises(ValueError, match="must be rank 2"):
        tf.function(lambda x: kernels.gates_grad(x, x, x, tf.zeros([1, 24]))).get_concrete_function(vector)
    with pytest.raises(ValueError, match="must be rank 2"):
        tf.function(lambda x: kernels.gates(tf.zeros([1, 16]), tf.zeros([1, 16]), x)).get_concrete_function(vector)


def test_the_library_is_keyed_by_source_tensorflow_and_cpu(monkeypatch):
    """A checkout shared by different CPUs never loads a library built for another one."""
    here = kernels.library_path()
    monkeypatch.setattr(kernels, "_cpu", lambda: b"flags : sse2")
    assert kernels.library_path() != here and kernels.library_path().endswith(".so")


def op_types(concrete) -> set[str]:
    """Every op type of a traced function and of the functions it calls."""
    graph_def = concrete.graph.as_graph_def()
    nodes = list(graph_def.node) + [n for fn in graph_def.library.function for n in fn.node_def]
    return {n.op for n in nodes}


def loss_and_gradients(model):
    @tf.function
    def step(inputs):
        with tf.GradientTape() as tape:
            logits, _ = model(inputs, model.zero_state(2))
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(inputs, logits))
        return loss, tape.gradient(loss, model.trainable_variables)
    return step


def test_the_training_step_runs_the_kernels_and_xla_runs_tensorflow_ops():
    assert kernels.available() and kernels.status() == "fused CPU kernels"
    tf.keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(hidden_size=16, embed_size=8))
    inputs = tf.constant(np.random.default_rng(2).integers(0, 256, size=(2, 9)), tf.int32)
    step = loss_and_gradients(model)
    assert {"MlstmGates", "MlstmGatesGrad"} <= op_types(step.get_concrete_function(inputs))
    xla = tf.function(step.python_function, jit_compile=True)  # custom CPU ops have no XLA kernel
    assert not {"MlstmGates", "MlstmGatesGrad"} & op_types(xla.get_concrete_function(inputs))
    (loss, grads), (xla_loss, xla_grads) = step(inputs), xla(inputs)
    np.testing.assert_allclose(loss, xla_loss, rtol=1e-5)
    for got, want in zip(grads, xla_grads):
        np.testing.assert_allclose(tf.convert_to_tensor(got), tf.convert_to_tensor(want), rtol=1e-3, atol=1e-4)


def test_without_the_library_the_model_runs_tensorflow_ops(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "library_path", lambda: str(tmp_path / "_kernels-missing.so"))
    kernels._load.cache_clear()
    try:
        assert not kernels.available() and "not built" in kernels.status()
        model = build_model(ModelConfig(hidden_size=16, embed_size=8))
        step = loss_and_gradients(model)
        inputs = tf.zeros([2, 5], tf.int32)
        assert not {"MlstmGates", "MlstmGatesGrad"} & op_types(step.get_concrete_function(inputs))
        assert np.isfinite(step(inputs)[0])
    finally:
        monkeypatch.undo()
        kernels._load.cache_clear()
    assert kernels.available()


@pytest.mark.parametrize("compiler, message", [("no-such-compiler", r"no C\+\+ compiler 'no-such-compiler'"),
                                               ("false", r"compiling .*kernels\.cc failed")])
def test_a_failed_build_is_one_clear_error(monkeypatch, tmp_path, compiler, message):
    monkeypatch.setattr(kernels, "library_path", lambda: str(tmp_path / "_kernels-new.so"))
    monkeypatch.setenv("CXX", compiler)
    with pytest.raises(RuntimeError, match=message):
        kernels.build()
    assert not list(tmp_path.iterdir())  # no half-written library
