"""Sample text from a trained model, optionally with one cell unit held fixed (Radford's steering).

    python -m horovod_mlstm.generate --model_dir M --prime "This product" --length 300 \
        --temperature 0.8 [--seed S] [--set_unit K=V ...]

The model emits bytes, and byte-by-byte sampling can produce invalid UTF-8. Sampling is
therefore restricted, at every step, to the bytes that can continue valid UTF-8 (the
distribution is renormalised over them), so the output is always valid UTF-8 and exactly
`--length` characters (code points) long, however untrained the model.
"""

from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf
from absl import app, flags

from horovod_mlstm import distributed as dist
from horovod_mlstm.checkpoint import CheckpointError
from horovod_mlstm.flags import define_common
from horovod_mlstm.inference import encode, load_trained_model


def allowed_next_bytes(pending: bytes) -> np.ndarray:
    """Boolean mask over 256 byte values that keep the text valid UTF-8 (RFC 3629).

    `pending` is the incomplete multi-byte character so far (empty at a character boundary).
    """
    ok = np.zeros(256, bool)
    if not pending:
        ok[0x01:0x80] = True   # ASCII (no NUL)
        ok[0xC2:0xF5] = True   # lead bytes of 2-, 3- and 4-byte characters
        return ok
    lead, seen = pending[0], len(pending)
    lo, hi = 0x80, 0xBF
    if seen == 1:  # the second byte has extra limits (no overlongs, surrogates or > U+10FFFF)
        lo, hi = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(lead, (lo, hi))
    ok[lo:hi + 1] = True
    return ok


def char_length(lead: int) -> int:
    return 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


def parse_set_units(specs: list[str], hidden_size: int) -> dict[int, float]:
    units = {}
    for spec in specs:
        try:
            k, v = spec.split("=")
            units[int(k)] = float(v)
        except ValueError:
            raise ValueError(f"--set_unit {spec!r} is not K=V (a unit index and a value)") from None
        if not 0 <= int(k) < hidden_size:
            raise ValueError(f"--set_unit unit {k} is outside 0..{hidden_size - 1}")
    return units


def sample(model, prime: str, length: int, temperature: float = 1.0, seed: int = 0,
           set_units: dict[int, float] | None = None) -> str:
    """`length` characters sampled after `prime`, with the units in `set_units` fixed in the cell state."""
    if temperature <= 0:
        raise ValueError("--temperature must be positive")
    rng = np.random.default_rng(seed)
    units = sorted((set_units or {}).items())
    index = tf.constant([[u] for u, _ in units] or np.zeros([0, 1]), tf.int32)
    values = tf.constant([v for _, v in units], tf.float32)

    @tf.function
    def step(byte, h, c):
        logits, (h, c) = model(tf.reshape(byte, [1, 1]), (h, c))
        if units:  # hold the chosen cell units at their values, every step
            c = tf.transpose(tf.tensor_scatter_nd_update(tf.transpose(c), index, values[:, None]))
        return logits[0, -1], h, c

    h, c = model.zero_state(1)
    logits = None
    for byte in encode(prime):
        logits, h, c = step(tf.constant(byte, tf.int32), h, c)
    out, pending, chars = bytearray(), b"", 0
    while chars < length:
        ok = allowed_next_bytes(pending)
        z = logits.numpy().astype(np.float64) / temperature
        z = np.where(ok, z - z[ok].max(), -np.inf)
        p = np.exp(z)
        byte = int(rng.choice(256, p=p / p.sum()))
        out.append(byte)
        pending += bytes([byte])
        if len(pending) == char_length(pending[0]):
            pending, chars = b"", chars + 1
        logits, h, c = step(tf.constant(byte, tf.int32), h, c)
    return out.decode("utf-8")


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if FLAGS.length < 0:
        sys.exit("error: --length must not be negative")
    dist.init(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
    try:
        model = load_trained_model(FLAGS.model_dir)
        units = parse_set_units(FLAGS.set_unit, model.config.hidden_size)
        text = sample(model, FLAGS.prime, FLAGS.length, FLAGS.temperature, FLAGS.seed, units)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(FLAGS.prime + text, flush=True)


if __name__ == "__main__":
    define_common()
    flags.DEFINE_string("prime", "", "Text the model reads before sampling.")
    flags.DEFINE_integer("length", 300, "Characters (Unicode code points) to sample.")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature; lower is more conservative.")
    flags.DEFINE_multi_string("set_unit", [], "K=V: hold cell unit K at value V while sampling (repeatable).")
    app.run(main)
