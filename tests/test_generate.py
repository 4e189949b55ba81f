"""Sampling: always valid UTF-8 of exactly the asked length; unit steering and bad flags."""

import numpy as np
import pytest

from conftest import last_line, python
from horovod_mlstm.generate import allowed_next_bytes, char_length


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


def test_masks_follow_rfc3629():
    start = allowed_next_bytes(b"")
    assert start[ord("a")] and start[0xC2] and start[0xF4]
    assert not start[0x80] and not start[0xC0] and not start[0xF5] and not start[0]
    assert np.flatnonzero(allowed_next_bytes(b"\xe0")).min() == 0xA0        # no overlong 3-byte forms
    assert np.flatnonzero(allowed_next_bytes(b"\xed")).max() == 0x9F        # no surrogates
    assert np.flatnonzero(allowed_next_bytes(b"\xf4")).max() == 0x8F        # nothing above U+10FFFF


def test_cli_samples_the_asked_length(tiny_model_dir):
    proc = python("-m", "horovod_mlstm.generate", f"--model_dir={tiny_model_dir}", "--prime=This product",
                  "--length=120", "--temperature=0.8", "--seed=3", "--set_unit=5=1.5", check=True)
    text = proc.stdout.rstrip("\n")
    assert text.startswith("This product")
    assert len(text) - len("This product") == 120
    again = python("-m", "horovod_mlstm.generate", f"--model_dir={tiny_model_dir}", "--prime=This product",
                   "--length=120", "--temperature=0.8", "--seed=3", "--set_unit=5=1.5", check=True)
    assert again.stdout == proc.stdout  # a seed fixes the sample


@pytest.mark.parametrize("args, message", [
    (["--set_unit=5"], "is not K=V"),
    (["--set_unit=99999=1"], "outside"),
    (["--temperature=0"], "--temperature must be positive"),
])
def test_bad_flags(tiny_model_dir, args, message):
    proc = python("-m", "horovod_mlstm.generate", f"--model_dir={tiny_model_dir}", "--length=5", *args)
    assert proc.returncode != 0 and message in last_line(proc.stderr)


def test_missing_model(tmp_path):
    proc = python("-m", "horovod_mlstm.generate", f"--model_dir={tmp_path}", "--length=5")
    assert proc.returncode != 0 and "no trained model" in last_line(proc.stderr)
