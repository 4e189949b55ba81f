"""Sample text from a trained model, optionally with one cell unit held fixed (Radford's steering).

    python -m horovod_mlstm.generate --model_dir M --prime "This product" --length 300 \
        --temperature 0.8 [--seed S] [--set_unit K=V ...] [--heatmap heat.png [--heatmap_unit U]]

The model emits bytes, and byte-by-byte sampling can produce invalid UTF-8. Sampling is
therefore restricted, at every step, to the bytes that can continue valid UTF-8 (the
distribution is renormalised over them), so the output is always valid UTF-8 and exactly
`--length` characters (code points) long, however untrained the model.

--heatmap draws the printed text (prime and sample) with each character coloured by one unit's
cell state, with visualize's drawing (horovod_mlstm.heatmap). The model re-reads the whole text
from a zero state with no unit held, so under --set_unit the picture shows how the unit itself
responds to the text the steering produced (the held value would be one flat colour).

SIGINT (Ctrl-C) and SIGTERM stop a generation with one line and the shell's exit status for the
signal (128 + its number: 130 and 143); nothing is printed or written. (Before the handlers are
installed, in the first seconds of TensorFlow's import, Python's defaults apply.)
"""

from __future__ import annotations

import math
import signal
import sys

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from horovod_mlstm import distributed as dist
from horovod_mlstm.checkpoint import CheckpointError
from horovod_mlstm.flags import define_common
from horovod_mlstm.heatmap import HeatmapError, check_length, check_output, encode_text, write_heatmap
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


def parse_set_units(specs: list[str]) -> dict[int, float]:
    """{unit: value} from K=V specs; each unit once, each value finite (a NaN or inf would poison the state)."""
    units = {}
    for spec in specs:
        try:
            k, v = spec.split("=")
            unit, value = int(k), float(v)
        except ValueError:
            raise ValueError(f"--set_unit {spec!r} is not K=V (a unit index and a value)") from None
        if not math.isfinite(value):
            raise ValueError(f"--set_unit {spec!r}: the value must be a finite number")
        if unit in units:
            raise ValueError(f"--set_unit gives unit {unit} twice ({unit}={units[unit]:g} and {spec})")
        units[unit] = value
    return units


def check_units(units, hidden_size: int, flag: str = "--set_unit") -> None:
    for unit in units:
        if not 0 <= unit < hidden_size:
            raise ValueError(f"{flag} unit {unit} is outside 0..{hidden_size - 1}")


def check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be positive and finite, got {temperature}")


def sample(model, prime: str, length: int, temperature: float = 1.0, seed: int = 0,
           set_units: dict[int, float] | None = None) -> str:
    """`length` characters sampled after `prime`, with the units in `set_units` fixed in the cell state."""
    check_temperature(temperature)
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


def heatmap_of_sample(model, prime: str, text: str, unit: int, set_units: dict[int, float], path: str) -> np.ndarray:
    """Draws `unit` over prime + sampled text as the model re-reads it, no unit held; returns the values drawn."""
    held = set_units.get(unit)
    steered = "" if held is None else f", sampled with unit {unit} held at {held:g}"
    return write_heatmap(model, encode(prime) + text.encode("utf-8"), unit, path,
                         title=f"unit {unit} re-reading the generated text{steered}")


class Stopped(BaseException):
    """A stop signal arrived, raised from its handler wherever the main thread is.

    A BaseException, like KeyboardInterrupt, so that code catching Exception on the way (logging's
    emit does) cannot swallow it.
    """


def stop_on_signal(signum, frame):
    raise Stopped(signum)


def unit_for_heatmap(FLAGS, set_units: dict[int, float]) -> int | None:
    """--heatmap_unit, or the one unit --set_unit holds; None without --heatmap."""
    if FLAGS.heatmap is None:
        if FLAGS.heatmap_unit is not None:
            raise ValueError("--heatmap_unit needs --heatmap PATH")
        return None
    if FLAGS.heatmap_unit is not None:
        return FLAGS.heatmap_unit
    if len(set_units) == 1:
        return next(iter(set_units))
    raise ValueError("--heatmap needs --heatmap_unit U (it defaults to the unit of a single --set_unit)")


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop_on_signal)
    try:
        if FLAGS.length < 0:
            raise ValueError("--length must not be negative")
        check_temperature(FLAGS.temperature)
        units = parse_set_units(FLAGS.set_unit)
        prime = encode_text(FLAGS.prime, "--prime")
        unit_to_draw = unit_for_heatmap(FLAGS, units)
        if unit_to_draw is not None:
            check_output(FLAGS.heatmap, "--heatmap")
            check_length(len(prime.decode("utf-8")) - 1 + FLAGS.length, "--prime and --length together")
        dist.init(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
        model = load_trained_model(FLAGS.model_dir)
        check_units(units, model.config.hidden_size)
        if unit_to_draw is not None:
            check_units([unit_to_draw], model.config.hidden_size, "--heatmap_unit")
        logging.info("sampling %d characters", FLAGS.length)
        text = sample(model, FLAGS.prime, FLAGS.length, FLAGS.temperature, FLAGS.seed, units)
        if unit_to_draw is not None:
            heatmap_of_sample(model, FLAGS.prime, text, unit_to_draw, units, FLAGS.heatmap)
    except (CheckpointError, FileNotFoundError, HeatmapError, ValueError) as e:
        sys.exit(f"error: {e}")
    except Stopped as stop:
        name = signal.Signals(stop.args[0]).name
        print(f"error: stopped by {name}; nothing printed or written", file=sys.stderr, flush=True)
        sys.exit(128 + stop.args[0])
    print(FLAGS.prime + text, flush=True)


if __name__ == "__main__":
    define_common()
    flags.DEFINE_string("prime", "", "Text the model reads before sampling.")
    flags.DEFINE_integer("length", 300, "Characters (Unicode code points) to sample.")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature; lower is more conservative.")
    flags.DEFINE_multi_string("set_unit", [], "K=V: hold cell unit K at value V while sampling (repeatable).")
    flags.DEFINE_string("heatmap", None, "Also draw the printed text as a PNG here, each character coloured by "
                        "--heatmap_unit's cell state when the model re-reads the text (no unit held).")
    flags.DEFINE_integer("heatmap_unit", None, "Unit for --heatmap; default: the unit of a single --set_unit.")
    app.run(main)
