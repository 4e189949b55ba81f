"""Sampling: always valid UTF-8 of exactly the asked length; unit steering and bad flags."""

import signal
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ENV, PYTHON, REPO, last_line, python
from horovod_mlstm.generate import (allowed_next_bytes, char_length, check_temperature, parse_set_units,
                                    unit_for_heatmap)


@pytest.mark.unit
def test_any_walk_through_the_allowed_bytes_is_valid_utf8():
    rng = np.random.default_rng(0)
    for _ in range(300):
        out, pending, chars = bytearray(), b"", 0
        while chars < 20:
            byte = int(rng.choice(np.flatnonzero(allowed_next_bytes(pending))))
            out.append(byte)
            pending += bytes([byte])
            if len(pending) == char_length(pending[0]):
                pending, chars = b"", chars + 1
        assert len(out.decode("utf-8")) == 20  # strict decode: raises on invalid UTF-8


@pytest.mark.unit
def test_masks_follow_rfc3629():
    start = allowed_next_bytes(b"")
    assert start[ord("a")] and start[0xC2] and start[0xF4]
    assert not start[0x80] and not start[0xC0] and not start[0xF5] and not start[0]
    assert np.flatnonzero(allowed_next_bytes(b"\xe0")).min() == 0xA0        # no overlong 3-byte forms
    assert np.flatnonzero(allowed_next_bytes(b"\xed")).max() == 0x9F        # no surrogates
    assert np.flatnonzero(allowed_next_bytes(b"\xf4")).max() == 0x8F        # nothing above U+10FFFF


@pytest.mark.cli
def test_cli_samples_the_asked_length(tiny_model_dir):
    proc = python("-m", "horovod_mlstm.generate", f"--model_dir={tiny_model_dir}", "--prime=This product",
                  "--length=120", "--temperature=0.8", "--seed=3", "--set_unit=5=1.5", check=True)
    text = proc.stdout.rstrip("\n")
    assert text.startswith("This product")
    assert len(text) - len("This product") == 120
    again = python("-m", "horovod_mlstm.generate", f"--model_dir={tiny_model_dir}", "--prime=This product",
                   "--length=120", "--temperature=0.8", "--seed=3", "--set_unit=5=1.5", check=True)
    assert again.stdout == proc.stdout  # a seed fixes the sample


@pytest.mark.cli
@pytest.mark.parametrize("args, message", [
    (["--set_unit=5"], "is not K=V"),
    (["--set_unit=99999=1"], "outside"),
    (["--temperature=0"], "--temperature must be positive and finite, got 0.0"),
    (["--temperature=nan"], "--temperature must be positive and finite, got nan"),
    (["--set_unit=3=nan"], "--set_unit '3=nan': the value must be a finite number"),
    (["--set_unit=3=1", "--set_unit=4=0", "--set_unit=3=2"], "--set_unit gives unit 3 twice (3=1 and 3=2)"),
    (["--prime=caf\udce9 ok"], "--prime is not valid UTF-8 (byte 0xe9 at character 3)"),
    (["--heatmap=/nonexistent/h.png", "--heatmap_unit=3"], "directory /nonexistent does not exist"),
    (["--heatmap=h.png", "--heatmap_unit=32"], "--heatmap_unit unit 32 is outside 0..31"),
    (["--heatmap=h.png", "--heatmap_unit=3", "--length=0"], "nothing to draw: the text is empty"),
])
def test_bad_flags(tiny_model_dir, tmp_path, args, message):
    proc = python("-m", "horovod_mlstm.generate", f"--model_dir={tiny_model_dir}", "--length=5", *args, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr).startswith("error: ") and message in last_line(proc.stderr)
    assert proc.stdout == "" and not list(tmp_path.iterdir())


@pytest.mark.unit
@pytest.mark.parametrize("temperature", [-1.0, float("inf"), float("-inf")])
def test_temperature_must_be_positive_and_finite(temperature):
    with pytest.raises(ValueError, match="--temperature must be positive and finite"):
        check_temperature(temperature)


@pytest.mark.unit
@pytest.mark.parametrize("specs, message", [
    (["3=inf"], "must be a finite number"),
    (["3=-inf"], "must be a finite number"),
    (["3=1", "3=1"], "gives unit 3 twice"),
    (["3=1=2"], "is not K=V"),
])
def test_set_unit_specs(specs, message):
    with pytest.raises(ValueError, match=message):
        parse_set_units(specs)
    assert parse_set_units(["3=1", "4=-2.5"]) == {3: 1.0, 4: -2.5}


@pytest.mark.unit
@pytest.mark.parametrize("heatmap, unit, set_units, expected", [
    (None, None, {}, None),
    ("h.png", 7, {3: 1.0}, 7),
    ("h.png", None, {3: 1.0}, 3),
    ("h.png", None, {3: 1.0, 4: 1.0}, "needs --heatmap_unit"),
    ("h.png", None, {}, "needs --heatmap_unit"),
    (None, 7, {}, "--heatmap_unit needs --heatmap"),
])
def test_heatmap_unit_choice(heatmap, unit, set_units, expected):
    flag_values = SimpleNamespace(heatmap=heatmap, heatmap_unit=unit)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            unit_for_heatmap(flag_values, set_units)
    else:
        assert unit_for_heatmap(flag_values, set_units) == expected


@pytest.mark.cli
def test_heatmap_cli(tiny_model_dir, tmp_path):
    heatmap = tmp_path / "heat.png"
    proc = python("-m", "horovod_mlstm.generate", f"--model_dir={tiny_model_dir}", "--prime=The strings",
                  "--length=150", "--seed=2", "--set_unit=5=3.0", f"--heatmap={heatmap}", check=True)
    assert len(proc.stdout.rstrip("\n")) == len("The strings") + 150
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and heatmap.stat().st_size > 10_000


@pytest.mark.unit
def test_heatmap_of_a_steered_sample_shows_the_unit_unclamped(tiny_model_dir, tmp_path):
    """--set_unit holds the unit while sampling; re-reading the text, the heatmap shows the unit moving."""
    from horovod_mlstm.generate import heatmap_of_sample, sample
    from horovod_mlstm.inference import load_trained_model

    model = load_trained_model(str(tiny_model_dir))
    text = sample(model, "The strings", 80, seed=2, set_units={5: 3.0})
    values = heatmap_of_sample(model, "The strings", text, 5, {5: 3.0}, str(tmp_path / "heat.png"))
    assert len(values) == len("The strings") + 80  # one value per drawn character
    assert np.abs(values - 3.0).min() > 1.0 and np.ptp(values) > 1e-3  # far from the held 3.0, and moving


@pytest.mark.cli
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_ends_a_long_generation_with_one_line(tiny_model_dir, signum, status):
    proc = subprocess.Popen([PYTHON, "-m", "horovod_mlstm.generate", f"--model_dir={tiny_model_dir}",
                             "--length=10000000"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:  # start-up is done once generate says it is sampling
            seen.append(line)
            if "sampling" in line:
                break
        proc.send_signal(signum)
        stdout, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    stderr = "".join(seen) + rest
    assert proc.returncode == status
    assert "Traceback" not in stderr and "sampling" in "".join(seen)
    assert last_line(stderr) == f"error: stopped by {signal.Signals(signum).name}; nothing printed or written"
    assert stdout == ""


@pytest.mark.cli
def test_missing_model(tmp_path):
    proc = python("-m", "horovod_mlstm.generate", f"--model_dir={tmp_path}", "--length=5")
    assert proc.returncode != 0 and "no trained model" in last_line(proc.stderr)
