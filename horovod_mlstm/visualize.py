"""The sentiment-unit heatmap, as in Radford et al. 2017's per-character pictures: a text with each
character coloured by one cell unit's value after the model has read it.

    python -m horovod_mlstm.visualize --model_dir M --text "Great tuners, awful case." --unit 195
    python -m horovod_mlstm.visualize --model_dir M --text_file review.txt \
        --results M/transfer/results.json --output heat.png

The drawing (horovod_mlstm.heatmap, which generate --heatmap uses too) shows the cleaned text as
the featuriser reads it. With --results (transfer's results.json or a classifier.json) the unit is
the classifier's top unit and its sign is flipped if its weight is negative, so that warm always
means the second (positive) class. A classifier on concat_hidden (final, mean and max hidden side by
side) names a unit of one of the three: the drawn unit is that unit of the model.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from horovod_mlstm import distributed as dist
from horovod_mlstm.checkpoint import CheckpointError
from horovod_mlstm.records import DOC_END
from horovod_mlstm.flags import define_common
from horovod_mlstm.heatmap import HeatmapError, check_length, check_output, encode_text, write_heatmap
from horovod_mlstm.inference import CONCAT, CONCAT_PARTS, load_trained_model, readout_width


def unit_from_results(path: str, model_dir: str, hidden_size: int) -> tuple[int, float]:
    """(unit, sign) from transfer's results.json or a classifier.json (keys top_unit, top_unit_weight).

    The sign is -1 when the weight is negative, so the positive class is drawn warm. A concat_hidden
    top unit (0..3 x hidden - 1) is the unit of the part it falls in.
    """
    try:
        with open(path) as f:
            results = json.load(f)
    except OSError as e:
        raise HeatmapError(f"--results {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeatmapError(f"--results {path} is not JSON ({e})") from None
    if not isinstance(results, dict) or "top_unit" not in results or "top_unit_weight" not in results:
        raise HeatmapError(f"--results {path} has no top_unit and top_unit_weight (not a binary transfer "
                           "results.json or classifier.json); pass --unit instead")
    unit, weight = results["top_unit"], results["top_unit_weight"]
    if unit is None:
        raise HeatmapError(f"--results {path} selected no unit (top_unit is null: the classifier uses no unit); "
                           "pass --unit instead")
    if not isinstance(unit, int) or isinstance(unit, bool) or not isinstance(weight, (int, float)) or not weight:
        raise HeatmapError(f"--results {path}: top_unit {unit!r} / top_unit_weight {weight!r} are not a unit "
                           "index and a non-zero weight")
    featurization = results.get("featurization")
    readout = featurization.get("readout") if isinstance(featurization, dict) else None
    width = readout_width(readout, hidden_size)
    if not 0 <= unit < width:
        raise HeatmapError(f"--results {path}: top_unit {unit} is outside this model's 0..{width - 1} "
                           "(fitted on another model?)")
    if readout == CONCAT:
        logging.info("top_unit %d of %s is unit %d of its %s", unit, CONCAT, unit % hidden_size,
                     CONCAT_PARTS[unit // hidden_size])
        unit %= hidden_size
    fitted_on = results.get("model_dir")
    if isinstance(fitted_on, str) and os.path.realpath(fitted_on) != os.path.realpath(model_dir):
        logging.warning("--results %s was fitted on model_dir %s, not %s", path, fitted_on, model_dir)
    return unit, 1.0 if weight > 0 else -1.0


def read_text(FLAGS) -> tuple[str, str]:
    """(text, where it came from) from exactly one of --text and --text_file."""
    if (FLAGS.text is None) == (FLAGS.text_file is None):
        raise HeatmapError("give exactly one of --text and --text_file")
    if FLAGS.text is not None:
        return FLAGS.text, "--text"
    try:
        with open(FLAGS.text_file, encoding="utf-8") as f:
            return f.read(), f"--text_file {FLAGS.text_file}"
    except OSError as e:
        raise HeatmapError(f"--text_file {FLAGS.text_file}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        with open(FLAGS.text_file, "rb") as f:
            line = f.read()[:e.start].count(b"\n") + 1
        raise HeatmapError(f"--text_file {FLAGS.text_file} is not UTF-8 (line {line}: {e.reason})") from None


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    try:
        if (FLAGS.unit is None) == (FLAGS.results is None):
            raise HeatmapError("give exactly one of --unit U and --results FILE (a transfer results.json or "
                               "classifier.json)")
        if FLAGS.line_width < 10:
            raise HeatmapError("--line_width must be at least 10")
        check_output(FLAGS.output, "--output")
        text, source = read_text(FLAGS)
        data = encode_text(text, source)
        check_length(len(data.decode("utf-8")) - 1, source + " after cleaning")
        if data == DOC_END:
            raise HeatmapError(f"{source} is empty after cleaning")
        dist.init(FLAGS.intra_op_threads, FLAGS.inter_op_threads)
        model = load_trained_model(FLAGS.model_dir)
        hidden_size = model.config.hidden_size
        if FLAGS.unit is not None:
            if not 0 <= FLAGS.unit < hidden_size:
                raise HeatmapError(f"--unit {FLAGS.unit} is outside this model's 0..{hidden_size - 1}")
            unit, sign = FLAGS.unit, 1.0
        else:
            unit, sign = unit_from_results(FLAGS.results, FLAGS.model_dir, hidden_size)
        values = write_heatmap(model, data, unit, FLAGS.output, sign, title=f"unit {unit} of {FLAGS.model_dir}",
                               width=FLAGS.line_width)
    except (HeatmapError, CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"[visualize] unit {unit}{' (sign flipped)' if sign < 0 else ''} over {len(values)} characters: "
          f"min {values.min():+.3f}, max {values.max():+.3f}, last {values[-1]:+.3f}. Heatmap in {FLAGS.output}",
          flush=True)


if __name__ == "__main__":
    define_common()
    flags.DEFINE_string("text", None, "The text to draw.")
    flags.DEFINE_string("text_file", None, "A UTF-8 file whose whole content is the text to draw.")
    flags.DEFINE_integer("unit", None, "Cell unit to draw.")
    flags.DEFINE_string("results", None, "transfer's results.json or a classifier.json: draw its top unit, "
                        "signed so the positive class is warm.")
    flags.DEFINE_string("output", "heatmap.png", "PNG to write.")
    flags.DEFINE_integer("line_width", 80, "Characters per drawn line.")
    app.run(main)
