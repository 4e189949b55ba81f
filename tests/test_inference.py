"""The shared featuriser: batched, refilled, padded, chunked and windowed equals reading each text alone, for every
readout, in input order; a stream of texts is read a window at a time."""

import numpy as np
import pytest
import tensorflow as tf

from horovod_mlstm.inference import MIN_PIECE, READOUTS, Featurizer, encode, is_empty, load_trained_model, readout_width

pytestmark = pytest.mark.unit

TEXTS = ["great strings", "Terrible. Broke in a week &amp; returned it", "ok", "<b>Five</b> stars",
         "é ü 漢字 mixed bytes", "a much longer review " * 5, "line one\nline two"]


def read_alone(model, data: bytes) -> dict:
    """Every readout of one text, from one unmasked, unchunked call."""
    x = tf.constant(np.frombuffer(data, np.uint8)[None].astype(np.int32))
    hs, (h, c) = model.rnn(model.embed(x), model.zero_state(1))
    hs = hs.numpy()[0]
    return {"final_cell": c.numpy()[0], "final_hidden": h.numpy()[0], "mean_hidden": hs.mean(0),
            "max_hidden": hs.max(0), "concat_hidden": np.concatenate([h.numpy()[0], hs.mean(0), hs.max(0)])}


@pytest.mark.parametrize("text_prep", ["project", "radford"])
def test_batched_masked_features_equal_one_text_at_a_time(tiny_model_dir, text_prep):
    featurizers = {r: Featurizer(str(tiny_model_dir), text_prep, r, batch_size=3, chunk=7) for r in READOUTS}
    for featurizer in featurizers.values():
        featurizer.window = 4  # two windows of texts, each sorted on its own and put back in input order
    model = featurizers["final_cell"].model
    expected = [read_alone(model, encode(t, text_prep)) for t in TEXTS]
    for readout, featurizer in featurizers.items():
        features = featurizer.transform(TEXTS)
        assert features.shape == (len(TEXTS), readout_width(readout, 32)) and features.dtype == np.float32
        for row, alone in zip(features, expected):
            np.testing.assert_allclose(row, alone[readout], rtol=1e-4, atol=1e-5, err_msg=readout)
    # The readouts differ (padding never leaks into a mean or max: each row matched its own text above).
    assert not np.allclose(featurizers["mean_hidden"].transform(TEXTS), featurizers["max_hidden"].transform(TEXTS))


def test_concat_hidden_is_final_mean_and_max_hidden_side_by_side(tiny_model_dir):
    featurizer = Featurizer(str(tiny_model_dir), readout="concat_hidden", batch_size=3, chunk=7)
    featurizer.window = 4
    concat = featurizer.transform(TEXTS)
    every = featurizer.transform_all(TEXTS)
    assert concat.shape == (len(TEXTS), 96) and readout_width("concat_hidden", 32) == 96
    assert readout_width("final_cell", 32) == readout_width("max_hidden", 32) == 32
    np.testing.assert_array_equal(concat, np.concatenate([every[r] for r in ("final_hidden", "mean_hidden",
                                                                             "max_hidden")], axis=1))
    np.testing.assert_array_equal(every["concat_hidden"], concat)
    window = next(featurizer.stream(TEXTS, readouts=["concat_hidden", "final_cell"]))
    assert window["concat_hidden"].shape == (4, 96) and window["final_cell"].shape == (4, 32)
    np.testing.assert_array_equal(window["concat_hidden"], concat[:4])


def test_text_preps_frame_texts_as_documented():
    assert encode("Fine &amp; <i>dandy</i>\n\n ok") == b"\nFine & dandy ok"
    # OpenAI's encoder: unescape, newlines to spaces, strip, then "\n " + text + " "; tags stay.
    assert encode(" Fine &amp; <i>dandy</i>\n\nok ", "radford") == b"\n Fine & <i>dandy</i>  ok "
    assert is_empty("  <br/> \n", "project") and not is_empty("  <br/> \n", "radford")
    assert is_empty(" \n ", "radford") and not is_empty("ok", "project")


def test_identity_names_the_checkpoint_and_settings(tiny_model_dir):
    featurizer = Featurizer(str(tiny_model_dir), "radford", "mean_hidden")
    identity = featurizer.identity()
    assert identity["checkpoint"] == "ckpt-20" and len(identity["index_sha256"]) == 64
    assert featurizer.settings == {"text_prep": "radford", "readout": "mean_hidden"}
    with pytest.raises(ValueError, match="readout must be one of"):
        Featurizer(str(tiny_model_dir), readout="last")


def test_unusable_config_json_is_one_clear_error(tmp_path):
    for text in ('{"hidden_', '{"hidden_size": 8, "layers": 2}'):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=r"config.json is not a model config written by this project"):
            load_trained_model(str(tmp_path))


def test_a_stream_is_read_one_window_at_a_time(tiny_model_dir):
    """Memory follows the window, not the input: the first window's features come out before the texts
    after it are even read, and every window's features are those of its texts in their order."""
    featurizer = Featurizer(str(tiny_model_dir), batch_size=2, chunk=16)
    featurizer.window = 3
    pulled = []

    def texts():
        for i in range(8):
            pulled.append(i)
            yield TEXTS[i % len(TEXTS)]

    stream = featurizer.stream(texts(), readouts=["mean_hidden"])
    first = next(stream)["mean_hidden"]
    assert first.shape == (3, 32) and len(pulled) == 3
    rest = [window["mean_hidden"] for window in stream]
    assert [len(w) for w in rest] == [3, 2] and len(pulled) == 8
    expected = featurizer.transform_all([TEXTS[i % len(TEXTS)] for i in range(8)], readouts=["mean_hidden"])
    np.testing.assert_array_equal(np.concatenate([first, *rest]), expected["mean_hidden"])


def test_a_row_takes_the_next_text_when_its_own_ends(tiny_model_dir):
    """Texts are read longest first; a piece runs to where the first row's text ends (but at least
    MIN_PIECE and at most `chunk` bytes), and that row then takes the next text, so the batch stays
    full until no text is left; the features are each text's own, in input order."""
    featurizer = Featurizer(str(tiny_model_dir), batch_size=2, chunk=8)
    texts = ["y" * 2, "x" * 39, "v", "z" * 40, "w" * 9]
    assert [len(encode(t)) for t in texts] == [3, 40, 2, 41, 10] and MIN_PIECE == 8
    ended = []
    features = featurizer.transform(texts, progress=ended.append)
    # Rows: z (41) and x (40) for five pieces of 8; x ends and w (10) takes its row; z ends after 1 byte
    # of the next piece (7 bytes of padding, as 1 < MIN_PIECE), y (3) takes its row; w and y end together
    # in a piece of 3 (w pads 1); v (2) alone. Texts ended per piece: 1, 1, 2, 1 (pieces ending none are
    # not reported); positions computed: 5 x 2 x 8 + 2 x 8 + 2 x 3 + 1 x 2.
    assert ended == [1, 1, 2, 1] and featurizer.positions == 104
    alone = [read_alone(featurizer.model, encode(t))["final_cell"] for t in texts]
    np.testing.assert_allclose(features, alone, rtol=1e-4, atol=1e-5)


def test_progress_counts_every_text_once(tiny_model_dir):
    featurizer = Featurizer(str(tiny_model_dir), batch_size=3, chunk=16)
    counts = []
    featurizer.transform(TEXTS * 3, progress=counts.append)
    assert sum(counts) == len(TEXTS) * 3 and len(counts) > 1
