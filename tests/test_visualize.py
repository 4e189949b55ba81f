"""The unit heatmap: values per character are the model's cell state after each character, drawn
warm for positive and cool for negative; the unit and sign from transfer's results; bad input is one line."""

import json

import numpy as np
import pytest

from conftest import last_line, python
from horovod_mlstm.heatmap import HeatmapError, draw, per_character, wrap
from horovod_mlstm.visualize import unit_from_results

TEXT = "Tolle Saiten, café-Qualität ★ but the case broke."


@pytest.mark.unit
def test_wrap_breaks_at_spaces_and_keeps_every_character_in_order():
    text = "one two three " + "x" * 25 + " fourteen\nfive"
    lines = wrap(text, 10)
    assert [i for line in lines for i in line] == list(range(len(text)))
    assert all(len(line) <= 10 for line in lines)
    drawn = ["".join(text[i] for i in line) for line in lines]
    assert drawn[:2] == ["one two ", "three "]          # words are not split across lines
    assert drawn[2:5] == ["x" * 10, "x" * 10, "xxxxx "]  # unless longer than a line
    assert drawn[5:] == ["fourteen\n", "five"]             # a newline ends its line


@pytest.mark.unit
def test_a_multibyte_character_takes_the_value_after_its_last_byte():
    data = "\naé★".encode("utf-8")  # 1 + 1 + 2 + 3 bytes
    text, values = per_character(data, np.arange(len(data), dtype=np.float32))
    assert text == "\naé★"
    assert values.tolist() == [0, 1, 3, 6]


@pytest.mark.unit
def test_trace_is_the_cell_state_after_each_character(tiny_model_dir):
    import tensorflow as tf

    from horovod_mlstm.inference import encode, load_trained_model
    from horovod_mlstm.heatmap import unit_trace

    model = load_trained_model(str(tiny_model_dir))
    data = encode(TEXT)
    unit = 7
    text, values = per_character(data, unit_trace(model, data, unit))
    ends = np.cumsum([len(ch.encode("utf-8")) for ch in text])
    for j in (1, 12, 16, 21, 27, len(text) - 1):  # after plain, 2-byte (é, ä), 3-byte (★) characters, the end
        _, (_, c) = model(tf.constant([list(data[:ends[j]])], tf.int32), model.zero_state(1))
        assert values[j] == pytest.approx(float(c[0, unit]), abs=1e-5), (j, text[j])
    assert np.ptp(values) > 0  # the unit moves, so the comparison above means something


@pytest.mark.unit
def test_positive_is_warm_and_negative_cool(tmp_path):
    import matplotlib.image

    path = tmp_path / "h.png"
    draw("good " * 8 + "bad " * 10, np.array([1.0] * 40 + [-1.0] * 40), str(path), "value", width=40)
    rgb = matplotlib.image.imread(path)[..., :3]
    red, blue = rgb[..., 0], rgb[..., 2]
    warm, cool = red > blue + 0.3, blue > red + 0.3
    rows_warm, rows_cool = np.flatnonzero(warm.any(axis=1)), np.flatnonzero(cool.any(axis=1))
    assert warm.sum() > 1000 and cool.sum() > 1000
    text_rows = rows_cool[rows_cool < rgb.shape[0] * 0.6]   # the colour bar below holds both colours
    assert rows_warm.min() < text_rows.min()                # first line warm, the lines below cool
    assert not list(tmp_path.glob("*.partial*"))


@pytest.mark.unit
def test_a_concat_hidden_top_unit_is_the_unit_of_its_part(tmp_path):
    path = tmp_path / "classifier.json"
    for readout, unit, expected in [("concat_hidden", 2 * 32 + 5, 5), ("concat_hidden", 31, 31), ("max_hidden", 7, 7)]:
        path.write_text(json.dumps({"top_unit": unit, "top_unit_weight": -0.5,
                                    "featurization": {"text_prep": "project", "readout": readout}}))
        assert unit_from_results(str(path), "m", 32) == (expected, -1.0)
    for readout, unit in [("concat_hidden", 96), ("mean_hidden", 32)]:
        path.write_text(json.dumps({"top_unit": unit, "top_unit_weight": 1.0, "featurization": {"readout": readout}}))
        with pytest.raises(HeatmapError, match=f"top_unit {unit} is outside this model's 0..{unit - 1}"):
            unit_from_results(str(path), "m", 32)


def summary(proc):
    """(min, max, last) from visualize's final line."""
    line = proc.stdout.strip().splitlines()[-1]
    numbers = line.split("characters: ")[1].split(". Heatmap")[0]
    return [float(part.split()[-1]) for part in numbers.split(", ")]


@pytest.mark.cli
def test_cli_unit_and_results_sign(tiny_model_dir, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"top_unit": 3, "top_unit_weight": -0.8, "model_dir": str(tiny_model_dir)}))
    by_unit = python("-m", "horovod_mlstm.visualize", f"--model_dir={tiny_model_dir}", f"--text={TEXT}",
                     "--unit=3", f"--output={tmp_path / 'unit.png'}", check=True)
    by_results = python("-m", "horovod_mlstm.visualize", f"--model_dir={tiny_model_dir}", f"--text={TEXT}",
                        f"--results={results}", f"--output={tmp_path / 'results.png'}", check=True)
    assert (tmp_path / "unit.png").stat().st_size > 10_000 and (tmp_path / "results.png").exists()
    assert "sign flipped" in by_results.stdout
    low, high, last = summary(by_unit)
    assert summary(by_results) == pytest.approx([-high, -low, -last], abs=1e-3)
    assert f"over {len(TEXT)} characters" in by_unit.stdout


@pytest.fixture
def null_results(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"top_unit": None, "top_unit_weight": 0.0}))
    return path


@pytest.fixture
def latin1_file(tmp_path):
    path = tmp_path / "review.txt"
    path.write_bytes("fine\nna\xefve r\xe9sum\xe9\n".encode("latin-1"))
    return path


@pytest.mark.cli
@pytest.mark.parametrize("args, message", [
    (["--text=hi", "--results={null_results}"], "selected no unit (top_unit is null"),
    (["--text=hi", "--unit=32"], "--unit 32 is outside this model's 0..31"),
    (["--text=hi"], "give exactly one of --unit U and --results FILE"),
    (["--unit=1"], "give exactly one of --text and --text_file"),
    (["--unit=1", "--text=caf\udce9"], "--text is not valid UTF-8 (byte 0xe9 at character 3)"),
    (["--unit=1", "--text_file={latin1_file}"], "is not UTF-8 (line 2: invalid continuation byte)"),
    (["--unit=1", "--text=  <br/>  "], "--text is empty after cleaning"),
    (["--unit=1", "--text=hi", "--output=/nonexistent/h.png"], "directory /nonexistent does not exist"),
    (["--unit=1", "--text=hi", "--output={latin1_file}"], "review.txt must end in .png"),
])
def test_bad_input_is_one_line(tiny_model_dir, tmp_path, null_results, latin1_file, args, message):
    args = [a.format(null_results=null_results, latin1_file=latin1_file) for a in args]
    proc = python("-m", "horovod_mlstm.visualize", f"--model_dir={tiny_model_dir}",
                  f"--output={tmp_path / 'h.png'}", *args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr).startswith("error: ") and message in last_line(proc.stderr)
    assert not list(tmp_path.glob("*.png"))
