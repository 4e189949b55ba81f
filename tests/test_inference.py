"""The shared featuriser: batched, sorted, masked and chunked equals reading each text alone."""

import numpy as np
import pytest
import tensorflow as tf

from horovod_mlstm.inference import encode, final_states, load_trained_model
from horovod_mlstm.model import ModelConfig, build_model


def test_batched_masked_states_equal_one_text_at_a_time():
    tf.keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(hidden_size=16, embed_size=8))
    texts = ["great strings", "Terrible. Broke in a week &amp; returned it", "ok", "<b>Five</b> stars",
             "é ü 漢字 mixed bytes", "a much longer review " * 5]
    states, rate = final_states(model, texts, batch_size=4, chunk=7)
    assert states.shape == (len(texts), 16) and rate > 0
    for text, state in zip(texts, states):
        data = np.frombuffer(encode(text), np.uint8)[None].astype(np.int32)
        _, (_, c) = model(tf.constant(data), model.zero_state(1))
        np.testing.assert_allclose(state, c.numpy()[0], rtol=1e-5, atol=1e-6)


def test_encode_frames_and_cleans_like_training_documents():
    assert encode("Fine &amp; <i>dandy</i>\n\n ok") == b"\nFine & dandy ok"


def test_unusable_config_json_is_one_clear_error(tmp_path):
    for text in ('{"hidden_', '{"hidden_size": 8, "layers": 2}'):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=r"config.json is not a model config written by train.py"):
            load_trained_model(str(tmp_path))
