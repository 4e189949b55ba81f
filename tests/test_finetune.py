"""finetune: the batches, the loss (its global mean, the auxiliary next-byte term), the readouts against
the featuriser's, the standardised head as a classifier, bad input in one line; then real runs: classify
and the Python API give the fine-tuned model's test predictions, 2 ranks killed with -9 and rerun train
what 1 rank trains, and SIGTERM then the same command ends where an uninterrupted run ends."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest
import tensorflow as tf

from conftest import ENV, HOROVODRUN, PYTHON, REPO, last_line, python
from conftest import run as run_command
from horovod_mlstm import corpus, modeldir
from horovod_mlstm import distributed as dist
from horovod_mlstm.checkpoint import Checkpointer
from horovod_mlstm.classifier import Classifier
from horovod_mlstm.finetune import (BatchPlan, FinetuneConfig, FineTuner, TrainingTexts, open_output_dir, pool,
                                    rank_batch, recorded_settings, run)
from horovod_mlstm.inference import Featurizer, encode
from horovod_mlstm.metrics import xent
from horovod_mlstm.model import ModelConfig, build_model
from horovod_mlstm.stopping import StopRequest
from horovod_mlstm.tasks import Split, TaskError
from horovod_mlstm.textfiles import InputError

TEXTS = ["Great sound, I love it.", "Broke in a week.", "x", "It works. " * 12, "Terrible &amp; cheap.\nNever again."]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """Synthetic labelled reviews: train, val and test CSVs (column text, labels neg/pos); the test set ends
    with TEXTS (a one-byte text, markup, a newline, a text longer than --max_bytes in the runs below)."""
    work = tmp_path_factory.mktemp("task")
    for seed, (split, n) in enumerate((("train", 96), ("val", 24), ("test", 24))):
        with open(work / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "text"])
            writer.writerows(("pos" if r["overall"] >= 4 else "neg", r["reviewText"])
                             for r in corpus.reviews(n, seed=300 + seed))
            if split == "test":
                writer.writerows(zip(["pos", "neg", "neg", "pos", "neg"], TEXTS))
    return work


def config(tmp_path, **overrides) -> FinetuneConfig:
    values = {"model_dir": str(tmp_path / "lm"), "output_dir": str(tmp_path / "out"), "train": "train.csv",
              "val": "val.csv", "test": "test.csv", "text_column": "text", "global_batch": 4, "dropout": 0.0,
              "warmup_steps": 0, "precision": "fp32", **overrides}
    return FinetuneConfig(**values)


def tiny_model(seed=0, hidden=16):
    tf.keras.utils.set_random_seed(seed)
    return build_model(ModelConfig(hidden_size=hidden, embed_size=8))


def padded(texts):
    return padded_bytes([encode(t) for t in texts])


def padded_bytes(encoded):
    lengths = np.array([len(e) for e in encoded])
    x = np.zeros([len(encoded), lengths.max()], np.int32)
    for row, e in enumerate(encoded):
        x[row, :len(e)] = np.frombuffer(e, np.uint8)
    return tf.constant(x), tf.constant(lengths, tf.int32)


# ---------------------------------------------------------------- in process

@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    ({"output_dir": ""}, "--output_dir is required"),
    ({"output_dir": "lm_dir", "model_dir": "lm_dir"}, "--output_dir must not be the pretrained --model_dir"),
    ({"test": ""}, "--test is required (or --imdb_dir)"),
    ({"imdb_dir": "imdb"}, "give --imdb_dir or --train/--val/--test, not both"),
    ({"final_imdb_test": 5000}, "--final_imdb_test needs --imdb_dir"),
    ({"dropout": 1.0}, "--dropout must be in [0, 1)"),
    ({"aux_lm_weight": -1.0}, "--aux_lm_weight must be a finite number >= 0"),
    ({"max_bytes": 0}, "--max_bytes must be at least 1"),
    ({"data_dir": "data/imdb"}, "--data_dir is not read by finetune"),
])
def test_bad_settings_are_one_line_naming_the_flag(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        config(tmp_path, **overrides)


@pytest.mark.unit
def test_the_global_batch_must_divide_over_ranks_and_micro_batches(tmp_path):
    assert config(tmp_path, global_batch=8, backward_passes_per_step=2).rows_per_rank(2) == 4
    with pytest.raises(ValueError, match="--global_batch 6 does not divide over 2 rank"):
        config(tmp_path, global_batch=6, backward_passes_per_step=2).rows_per_rank(2)


@pytest.mark.unit
def test_batches_hold_every_text_once_per_epoch_by_length_the_same_from_the_step_alone():
    lengths = np.random.default_rng(0).integers(1, 500, 1003)
    plan = BatchPlan(lengths, 10, seed=3)
    assert plan.steps_per_epoch == 101
    for epoch in (0, 1):
        batches = [plan.batch(epoch * 101 + k) for k in range(101)]
        indices = np.concatenate(batches)
        assert sorted(indices[indices >= 0]) == list(range(1003)) and (indices < 0).sum() == 7
        # Sorted within pools of 50 batches: a batch spans a small part of the length range.
        spans = [np.ptp(lengths[b[b >= 0]]) for b in batches]
        assert np.median(spans) < 0.1 * np.ptp(lengths)
    assert not np.array_equal(plan.batch(0), plan.batch(101))  # another epoch, another order
    again = BatchPlan(lengths, 10, seed=3)
    assert np.array_equal(again.batch(150), plan.batch(150))  # a resumed run draws the same batch


@pytest.mark.unit
def test_rank_shares_weigh_each_text_and_byte_by_the_global_count():
    texts = TrainingTexts.of(Split("", TEXTS, np.array([1, 0, 0, 1, 0]), {}), "project", max_bytes=40)
    assert texts.cut == 1 and max(texts.lengths) == 40
    indices = np.array([2, 0, 4, 3, 1, -1, -1, -1])  # a last batch of 5 texts, filled up
    shares = [rank_batch(texts, indices, step=7, first_row=r * 4, rows=4) for r in (0, 1)]
    assert sum(float(tf.reduce_sum(s["text_weight"])) for s in shares) == pytest.approx(1.0)
    assert [float(w) for w in shares[1]["text_weight"]] == [pytest.approx(0.2), 0.0, 0.0, 0.0]
    assert sum(float(tf.reduce_sum(s["byte_weight"])) for s in shares) == pytest.approx(1.0)
    targets = sum(int(tf.math.count_nonzero(s["byte_weight"])) for s in shares)
    assert targets == sum(int(texts.lengths[i]) - 1 for i in indices if i >= 0)
    assert shares[0]["inputs"].shape == (4, int(max(texts.lengths[[2, 0, 4, 3]])))  # padded to its own longest
    assert shares[1]["rows"].numpy().tolist() == [4, 5, 6, 7] and set(shares[1]["step"].numpy()) == {7}


@pytest.mark.unit
@pytest.mark.parametrize("readout", ["mean_hidden", "max_hidden", "final_hidden", "concat_hidden"])
def test_the_readout_of_padded_texts_is_the_featurisers(tmp_path, readout, fused_kernels):
    model = tiny_model()
    x, lengths = padded(TEXTS)
    pooled = pool(model.rnn(model.embed(x), model.zero_state(len(TEXTS)))[0], lengths, readout).numpy()
    featurised = Featurizer("in memory", readout=readout, batch_size=2, chunk=7, model=model).transform(TEXTS)
    np.testing.assert_allclose(pooled, featurised, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_concat_hidden_is_the_final_mean_and_max_pools_side_by_side_and_the_head_is_as_wide(tmp_path, fused_kernels):
    dist.init()
    model = tiny_model(hidden=8)
    x, lengths = padded(TEXTS)
    hs = model.rnn(model.embed(x), model.zero_state(len(TEXTS)))[0]
    parts = [pool(hs, lengths, r).numpy() for r in ("final_hidden", "mean_hidden", "max_hidden")]
    concat = pool(hs, lengths, "concat_hidden").numpy()
    assert concat.shape == (len(TEXTS), 24)
    np.testing.assert_array_equal(concat, np.concatenate(parts, axis=1))
    # The head, its standardisation and dropout take the readout's width; the other readouts keep n, so
    # the checkpoints of their runs restore as before.
    for readout in ("mean_hidden", "max_hidden", "final_hidden"):
        tuner = FineTuner(model, 2, config(tmp_path, readout=readout))
        assert tuner.head.kernel.shape == (8, 2) and tuner.mean.shape == tuner.scale.shape == (8,)
    labels = np.array([1, 0, 0, 1, 0])
    texts = TrainingTexts.of(Split("", TEXTS, labels, {}), "project", max_bytes=30)
    tuner = FineTuner(model, 3, config(tmp_path, readout="concat_hidden", global_batch=5, dropout=0.5))
    assert tuner.head.kernel.shape == (24, 3) and tuner.mean.shape == tuner.scale.shape == (24,)
    tuner.standardise(texts, BatchPlan(texts.lengths, 5, seed=0), rows=5)
    features = np.concatenate([tuner.features(*padded_bytes([e])).numpy() for e in texts.encoded])
    np.testing.assert_allclose(tuner.mean.numpy(), features.mean(axis=0), rtol=1e-4, atol=1e-6)
    loss, _ = tuner.loss(**rank_batch(texts, np.arange(5), step=0, first_row=0, rows=5))  # 24-wide dropout masks
    assert np.isfinite(float(loss))
    tuner.head.set_weights([np.random.default_rng(0).normal(size=(24, 3)), np.zeros(3)])
    classifier = tuner.classifier(["a", "b", "c"], {})
    assert classifier.coef.shape == (3, 24) and classifier.mean.shape == (24,)
    np.testing.assert_allclose(classifier.predict_proba(features), tf.nn.softmax(tuner.classify(features)), atol=1e-6)


@pytest.mark.unit
def test_the_auxiliary_loss_adds_its_weight_times_the_mean_next_byte_loss(tmp_path, fused_kernels):
    dist.init()
    labels = np.array([1, 0, 0, 1, 0])
    texts = TrainingTexts.of(Split("", TEXTS, labels, {}), "project", max_bytes=1024)
    batch = rank_batch(texts, np.arange(5), step=0, first_row=0, rows=5)
    model = tiny_model()

    # Reference, text by text without padding: the mean classification loss and the mean over every
    # target byte of the next-byte loss.
    tuner = FineTuner(model, 2, config(tmp_path, aux_lm_weight=0.0))
    classification, nats = [], []
    for e, label in zip(texts.encoded, labels):
        x = tf.constant([list(e)], tf.int32)
        classification.append(float(xent([label], tuner.logits(x, tf.constant([len(e)])))[0]))
        logits, _ = model(x, model.zero_state(1))
        nats += list(xent(x[:, 1:], logits[:, :-1]).numpy()[0])
    classification, next_byte = float(np.mean(classification)), float(np.mean(nats))

    off, (shares,) = tuner.loss(**batch)
    assert float(off) == pytest.approx(classification, rel=1e-5)
    assert np.all(shares.numpy()[:, 1] == 0)
    assert not any(v is w for v in tuner.pretrained_variables for w in model.out.trainable_variables)

    for weight in (0.5, 2.0):
        on = FineTuner(model, 2, config(tmp_path, aux_lm_weight=weight))
        on.head.set_weights(tuner.head.get_weights())
        loss, (shares,) = on.loss(**batch)
        assert float(loss) == pytest.approx(classification + weight * next_byte, rel=1e-5)
        assert float(tf.reduce_sum(shares[:, 1])) == pytest.approx(next_byte, rel=1e-5)
        assert len(on.pretrained_variables) == len(tuner.pretrained_variables) + 2  # the softmax layer learns too


@pytest.mark.unit
def test_the_head_standardises_over_the_training_texts_and_saves_as_a_classifier(tmp_path, fused_kernels):
    dist.init()
    model = tiny_model()
    labels = np.array([1, 0, 0, 1, 0])
    texts = TrainingTexts.of(Split("", TEXTS, labels, {}), "project", max_bytes=30)
    for classes in (2, 3):
        tuner = FineTuner(model, classes, config(tmp_path, global_batch=2))
        tuner.standardise(texts, BatchPlan(texts.lengths, 2, seed=0), rows=2)
        features = np.concatenate([tuner.features(*padded_bytes([e])).numpy() for e in texts.encoded])
        np.testing.assert_allclose(tuner.mean.numpy(), features.mean(axis=0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(tuner.scale.numpy(), features.std(axis=0), rtol=1e-3, atol=1e-6)

        rng = np.random.default_rng(classes)
        tuner.head.set_weights([rng.normal(size=(16, classes)), rng.normal(size=classes)])
        classifier = tuner.classifier(["a", "b", "c"][:classes], {})
        assert classifier.coef.shape == (1 if classes == 2 else classes, 16)  # two classes: one row of log-odds
        np.testing.assert_allclose(classifier.predict_proba(features), tf.nn.softmax(tuner.classify(features)),
                                   atol=1e-6)


@pytest.mark.unit
def test_bad_input_is_one_line_and_a_busy_output_dir_is_refused(tmp_path, task_files, fused_kernels):
    dist.init()
    stop = StopRequest(0)
    modeldir.write_model(str(tmp_path / "lm"), tiny_model(), 0)
    paths = {s: str(task_files / f"{s}.csv") for s in ("train", "val", "test")}

    with pytest.raises(InputError, match="missing.csv: no such file"):
        run(config(tmp_path, **{**paths, "test": str(tmp_path / "missing.csv")}), stop)
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("text\nfine\ngood\n")
    with pytest.raises(InputError, match="unlabelled.csv:1: no column 'label'"):
        run(config(tmp_path, **{**paths, "train": str(unlabelled)}), stop)
    bad = tmp_path / "bad.csv"
    bad.write_text("label,text\npos,fine\nneg\n")
    with pytest.raises(InputError, match="bad.csv:3: row has 1 fields"):
        run(config(tmp_path, **{**paths, "val": str(bad)}), stop)
    one_class = tmp_path / "one_class.csv"
    one_class.write_text("label,text\npos,fine\npos,good\n")
    with pytest.raises(TaskError, match="labels must be at least two classes"):
        run(config(tmp_path, **{**paths, "train": str(one_class)}), stop)
    with pytest.raises(FileNotFoundError, match="no trained model in"):
        run(config(tmp_path, **paths, model_dir=str(tmp_path / "nothing")), stop)
    assert not (tmp_path / "out").exists()  # bad input leaves nothing behind

    (tmp_path / "busy").mkdir()
    holder = modeldir.Lock(str(tmp_path / "busy")).acquire()
    with pytest.raises(modeldir.ModelDirBusy, match="is in use by"):
        open_output_dir(config(tmp_path, **paths, output_dir=str(tmp_path / "busy")))
    holder.release()

    # A job that resumes must have the settings the output dir's run was started with.
    started = config(tmp_path, **paths, output_dir=str(tmp_path / "o"))
    open_output_dir(started).release()
    (tmp_path / "o" / "settings.json").write_text(json.dumps(recorded_settings(started)))
    Checkpointer(str(tmp_path / "o"), model=tiny_model()).save(3)
    with pytest.raises(ValueError, match="--learning_rate was 0.001, now 0.002"):
        open_output_dir(config(tmp_path, **paths, output_dir=str(tmp_path / "o"), learning_rate=2e-3))
    open_output_dir(config(tmp_path, **paths, output_dir=str(tmp_path / "o"), log_every=3)).release()


@pytest.mark.cli
def test_a_bad_flag_is_one_line_before_any_work(tmp_path):
    proc = python("-m", "horovod_mlstm.finetune", f"--model_dir={tmp_path}/lm", f"--output_dir={tmp_path}/o",
                  "--train=t.csv", "--val=v.csv", timeout=120)
    assert proc.returncode == 1 and last_line(proc.stderr) == "error: --test is required (or --imdb_dir)"
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- real runs

def finetune_args(task_files, lm, out, *extra):
    return ["-m", "horovod_mlstm.finetune", f"--model_dir={lm}", f"--output_dir={out}",
            *(f"--{s}={task_files / f'{s}.csv'}" for s in ("train", "val", "test")), "--text_column=text",
            "--global_batch=8", "--learning_rate=3e-3", "--pretrained_lr_multiplier=0.5", "--warmup_steps=2",
            "--dropout=0.2", "--precision=fp32", "--log_every=4", "--intra_op_threads=1", "--inter_op_threads=1",
            *extra]


def trained_weights(out) -> dict[str, np.ndarray]:
    """The model's and head's variables in the newest training checkpoint of a fine-tuning run."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(out / "checkpoints")))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.split("/")[0] in ("model", "head", "feature_mean", "feature_scale") and "OPTIMIZER_SLOT" not in k}


def assert_same_run(a, b):
    wa, wb = trained_weights(a), trained_weights(b)
    assert wa.keys() == wb.keys() and len(wa) >= 12
    for key in wa:
        np.testing.assert_allclose(wa[key], wb[key], rtol=1e-5, atol=1e-6, err_msg=key)
    sa, sb = (json.loads((out / "summary.json").read_text()) for out in (a, b))
    assert [h["val_accuracy"] for h in sa["history"]] == [h["val_accuracy"] for h in sb["history"]]
    assert (sa["best_step"], sa["test_accuracy"]) == (sb["best_step"], sb["test_accuracy"])


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A 24-unit model with random weights, written as a model dir."""
    folder = tmp_path_factory.mktemp("pretrained") / "lm"
    modeldir.write_model(str(folder), tiny_model(hidden=24), 0)
    return folder


@pytest.fixture(scope="module")
def straight(tmp_path_factory, task_files, lm_dir):
    """An uninterrupted one-process run: 2 epochs of 12 steps, validated after each."""
    out = tmp_path_factory.mktemp("straight") / "out"
    python(*finetune_args(task_files, lm_dir, out, "--max_epochs=2", "--aux_lm_weight=0.5"), check=True)
    return out


@pytest.mark.cli
@pytest.mark.parametrize("readout", ["max_hidden", "concat_hidden"])
def test_classify_and_the_python_api_reproduce_the_fine_tuned_models_test_predictions(tmp_path, task_files, lm_dir,
                                                                                      readout):
    out = tmp_path / "out"
    proc = python(*finetune_args(task_files, lm_dir, out, "--max_epochs=1", f"--readout={readout}",
                                 "--max_bytes=64"), check=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] == summary["final_step"] == 12 and summary["training_texts_cut"] > 0
    assert "[finetune] done: test accuracy" in last_line(proc.stdout)
    assert "[finetune] step 4/12 epoch 1 loss" in proc.stdout and "[eval] step 12 validation accuracy" in proc.stdout
    events = [e for path in (out / "tensorboard").iterdir() for e in tf.compat.v1.train.summary_iterator(str(path))]
    tags = {v.tag for e in events for v in e.summary.value}
    assert {"train/loss", "train/classification_loss", "learning_rate", "val/accuracy"} <= tags
    with open(task_files / "test.csv", newline="") as f:
        test = list(csv.DictReader(f))
    texts = [row["text"] for row in test]

    # The fine-tuned model and head of the last step (the one kept: the only validation), in process.
    model, _ = modeldir.load(str(lm_dir))
    tuner = FineTuner(model, 2, config(tmp_path, readout=readout))
    Checkpointer(str(out), writer=False, model=model, head=tuner.head, feature_mean=tuner.mean,
                 feature_scale=tuner.scale).restore(expect_partial=True)
    assert not np.allclose(model.rnn.wx.numpy(), modeldir.load(str(lm_dir))[0].rnn.wx.numpy())  # it was trained
    expected = tf.nn.softmax(tuner.logits(*padded(texts))).numpy()

    # The Python API, as for a transfer classifier.
    classifier = Classifier.load(str(out))
    assert classifier.featurization["readout"] == readout
    assert classifier.coef.shape == (1, 72 if readout == "concat_hidden" else 24)  # a 24-unit model
    featurizer = Featurizer(str(out / "model"), **classifier.featurization)
    classifier.check(featurizer)
    np.testing.assert_allclose(classifier.predict_proba(featurizer.transform(texts)), expected, atol=1e-5)

    # classify: the same probabilities, and the summary's test accuracy is its accuracy.
    python("-m", "horovod_mlstm.classify", f"--model_dir={out / 'model'}", f"--classifier={out}",
           f"--input={task_files / 'test.csv'}", "--text_column=text", f"--output={tmp_path / 'labels.csv'}",
           check=True)
    with open(tmp_path / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose([[float(r["p_neg"]), float(r["p_pos"])] for r in rows], expected, atol=1e-5)
    assert summary["test_accuracy"] == pytest.approx(np.mean([r["label"] == t["label"] for r, t in zip(rows, test)]))


def start(cmd, log):
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(log, text, proc, timeout=300):
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


@pytest.mark.multiproc
def test_two_ranks_killed_with_9_then_rerun_train_what_one_rank_trains(tmp_path, task_files, lm_dir, straight):
    out, log = tmp_path / "out", tmp_path / "log.txt"
    args = finetune_args(task_files, lm_dir, out, "--max_epochs=2", "--aux_lm_weight=0.5", "--checkpoint_every=3")
    proc = start([HOROVODRUN, "--gloo", "-np", "2", "-H", "localhost:2", PYTHON, *args], log)
    wait_for(log, "step 8/24", proc)  # after the checkpoint of step 6
    job = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert len(job) >= 3  # horovodrun and its two ranks
    for p in job:
        try:
            p.kill()
        except psutil.NoSuchProcess:  # horovodrun may end as soon as a rank is gone
            pass
    psutil.wait_procs(job, timeout=60)
    proc.wait(60)
    assert "2 rank(s) x 4 texts = global batch 8" in log.read_text()
    assert 6 <= int(tf.train.latest_checkpoint(str(out / "checkpoints")).rsplit("-", 1)[1]) < 24

    # Resumed by the project's launcher, as a user runs it (2 slots in hostfiles/localhost.txt).
    assert args[:2] == ["-m", "horovod_mlstm.finetune"]
    resumed = run_command(["bash", "launch/horovodrun.sh", "--gloo", "--finetune", *args[2:]], check=True, timeout=600)
    assert "resumed from" in resumed.stdout
    assert_same_run(straight, out)


@pytest.mark.multiproc
def test_sigterm_then_the_same_command_ends_as_the_uninterrupted_run(tmp_path, task_files, lm_dir, straight):
    out, log = tmp_path / "out", tmp_path / "log.txt"
    args = finetune_args(task_files, lm_dir, out, "--max_epochs=2", "--aux_lm_weight=0.5", "--checkpoint_every=3")
    proc = start([PYTHON, *args], log)
    wait_for(log, "step 4/24", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 75, log.read_text()[-3000:]
    text = log.read_text()
    assert "(SIGTERM); checkpoint written; run the same command to resume" in text
    stopped = int(text.split("[finetune] stopped at step ")[1].split()[0])
    assert 4 <= stopped < 24
    assert tf.train.latest_checkpoint(str(out / "checkpoints")).endswith(f"ckpt-{stopped}")

    resumed = python(*args, check=True, timeout=600)
    assert "resumed from" in resumed.stdout and f"at step {stopped}" in resumed.stdout
    assert_same_run(straight, out)
    again = python(*args, check=True)
    assert "nothing to do" in again.stdout
