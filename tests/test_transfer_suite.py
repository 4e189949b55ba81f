"""The transfer suite: every readout from one pass, splits that are stratified and disjoint, choices that never
see test labels, and a tiny end-to-end run (milestones, baselines, cache, report) that a rerun only reads back."""

import csv
import gzip
import json
import random
import types

import numpy as np
import pytest

from conftest import TINY_MODEL_FLAGS, last_line, python
from horovod_mlstm.experiments.transfer_suite import SUITE_READOUTS, load_tasks, score_readouts, tfidf_rows
from horovod_mlstm.inference import READOUTS, Featurizer
from horovod_mlstm.tasks import Split, Task, stratified_order
from horovod_mlstm.textfiles import InputError

POSITIVE, NEGATIVE = ["great", "lovely", "superb", "fun"], ["awful", "boring", "broken", "dull"]
FILLER = ["the", "film", "was", "plot", "a", "really"]


def reviews(n: int, seed: int) -> list[tuple[int, str]]:
    """n (label, text) rows, alternating labels; one sentiment word among filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(POSITIVE if i % 2 else NEGATIVE)] + rng.choices(FILLER, k=5)
        rng.shuffle(words)
        rows.append((i % 2, " ".join(words)))
    return rows


def write_csv(path, header: list[str], rows: list[list]) -> None:
    with (gzip.open if path.suffix == ".gz" else open)(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    """SST's layout (label,sentence; train/dev/test.csv) and IMDB's (label,stars,text; gzipped), a few dozen rows."""
    sst, imdb = tmp_path_factory.mktemp("sst"), tmp_path_factory.mktemp("imdb")
    for name, n, seed in (("train", 40, 1), ("dev", 20, 2), ("test", 20, 3)):
        write_csv(sst / f"{name}.csv", ["label", "sentence"], [list(r) for r in reviews(n, seed)])
    for name, n, seed in (("train", 60, 4), ("test", 40, 5)):
        write_csv(imdb / f"{name}.csv.gz", ["label", "stars", "text"],
                  [[label, 8 if label else 2, text + "<br /><br />the end"] for label, text in reviews(n, seed)])
    return sst, imdb


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_data):
    """A tiny model trained for 8 steps (128 characters a step) keeping milestones at 256 and 512 characters."""
    model_dir = tmp_path_factory.mktemp("suite") / "model"
    python("train.py", f"--model_dir={model_dir}", f"--data_dir={tiny_data}", "--train_steps=8",
           "--checkpoint_every=8", "--milestone_chars=256,512", *TINY_MODEL_FLAGS, check=True)
    return model_dir


@pytest.mark.unit
def test_transform_all_equals_transform_for_every_readout(pretrained):
    texts = [text for _, text in reviews(9, 0)] + ["a much longer review " * 12, "é 漢字"]
    featurizer = Featurizer(str(pretrained), batch_size=4, chunk=16)
    every = featurizer.transform_all(texts)
    assert set(every) == set(READOUTS)
    for readout in READOUTS:
        alone = Featurizer(str(pretrained), readout=readout, batch_size=4, chunk=16).transform(texts)
        np.testing.assert_array_equal(every[readout], alone, err_msg=readout)
    assert not np.allclose(every["final_cell"], every["mean_hidden"])


@pytest.mark.unit
def test_stratified_order_prefixes_keep_proportions_and_slices_are_disjoint():
    labels = np.array([0] * 30 + [1] * 10)  # 3:1
    order = stratified_order(labels, seed=7)
    assert sorted(order) == list(range(40))
    for n in (4, 8, 20):
        assert np.count_nonzero(labels[order[:n]] == 1) == n // 4
    assert np.array_equal(order, stratified_order(labels, seed=7))
    assert not np.array_equal(order, stratified_order(labels, seed=8))


@pytest.mark.unit
def test_each_readout_is_a_row_and_the_one_chosen_on_val_is_marked():
    rng = np.random.default_rng(0)
    labels = {s: rng.integers(0, 2, n) for s, n in (("train", 60), ("val", 40), ("test", 40), ("final_test", 80))}
    features = {s: {r: y[:, None] * (k + 1) * 0.3 + rng.normal(size=(len(y), 6)) for k, r in enumerate(READOUTS)}
                for s, y in labels.items()}
    task = Task("toy", ["0", "1"], {s: Split("toy.csv", [""] * len(y), y, {}) for s, y in labels.items()})
    rows = score_readouts(task, features)
    assert [r["readout"] for r in rows] == list(READOUTS) and all(0 <= r["final_test_accuracy"] <= 1 for r in rows)
    chosen = [r for r in rows if r["chosen_on_val"]]
    assert len(chosen) == 1 and chosen[0]["val_accuracy"] == max(r["val_accuracy"] for r in rows)

    reviewed = reviews(60, 1)
    splits = {"train": reviewed[:30], "val": reviewed[30:45], "test": reviewed[45:]}
    task = Task("toy", ["0", "1"], {s: Split("toy.csv", [t for _, t in v], np.array([y for y, _ in v]), {})
                                    for s, v in splits.items()})
    (row,) = tfidf_rows(task, "project")
    assert row["system"] == "tfidf" and row["chosen_on_val"] and row["test_accuracy"] > 0.8


def suite_flags(sst, imdb, **overrides):
    values = {"sst_dir": str(sst), "imdb_dir": str(imdb), "bpc_data_dir": "", "bpc_streams": 4, "seq_length": 32,
              "imdb_train": 30, "imdb_val": 20, "imdb_test": 20, "final_imdb_test": "all", "seed": 0}
    return types.SimpleNamespace(**{**values, **overrides})


@pytest.mark.cli
def test_bad_inputs_are_one_clear_line(task_dirs, tmp_path):
    sst, imdb = task_dirs
    tasks = load_tasks(suite_flags(sst, imdb))
    assert [t.name for t in tasks] == ["sst", "imdb"]
    imdb_splits = tasks[1].splits
    assert {s: v.labels.size for s, v in imdb_splits.items()} == {"train": 30, "val": 20, "test": 20, "final_test": 40}
    assert not set(imdb_splits["train"].texts) & set(imdb_splits["val"].texts)  # disjoint (the texts are distinct)
    assert imdb_splits["train"].labels.mean() == 0.5 and imdb_splits["test"].starts(imdb_splits["final_test"])
    for flags, message in [({"sst_dir": str(tmp_path / "nope")}, r"--sst_dir .*nope: no such directory"),
                           ({"imdb_train": 50}, r"train.csv.gz: 60 reviews, fewer than --imdb_train \+ --imdb_val"),
                           ({"final_imdb_test": "most"}, "--final_imdb_test must be a number of reviews or 'all'"),
                           ({"final_imdb_test": "10"}, "--final_imdb_test 10 is below --imdb_test 20"),
                           ({"sst_dir": "", "imdb_dir": ""}, "no task")]:
        with pytest.raises(InputError, match=message):
            load_tasks(suite_flags(sst, imdb, **flags))
    write_csv(tmp_path / "train.csv", ["label", "text"], [[0, "x"], [1, "y"]])
    with pytest.raises(InputError, match=r"train.csv:1: no column 'sentence' \(columns: label, text\)"):
        load_tasks(suite_flags(tmp_path, imdb))
    proc = python("-m", "horovod_mlstm.experiments.transfer_suite", f"--model_dir={tmp_path}",
                  f"--out_dir={tmp_path / 'out'}", f"--sst_dir={sst}", f"--imdb_dir={imdb}")
    assert proc.returncode != 0
    assert last_line(proc.stderr) == f"error: --model_dir {tmp_path}: no trained model there (missing config.json)"


@pytest.mark.cli
def test_suite_end_to_end_then_a_rerun_reads_every_model_back(pretrained, task_dirs, tiny_data, tmp_path):
    sst, imdb = task_dirs
    out = tmp_path / "suite"
    args = ["-m", "horovod_mlstm.experiments.transfer_suite", f"--model_dir={pretrained}", f"--out_dir={out}",
            f"--sst_dir={sst}", f"--imdb_dir={imdb}", "--imdb_train=30", "--imdb_val=20", "--imdb_test=20",
            "--final_imdb_test=all", f"--bpc_data_dir={tiny_data}", "--bpc_streams=4", "--seq_length=32",
            "--batch_size_per_worker=8", "--intra_op_threads=1", "--inter_op_threads=1"]
    first = python(*args, f"--demo_model_dir={tmp_path / 'no_demo'}", check=True, timeout=600)
    for name in ("results.json", "results.md", "accuracy_vs_chars.png", "bpc_vs_chars.png", "untrained/config.json"):
        assert (out / name).is_file(), name
    for png in ("accuracy_vs_chars.png", "bpc_vs_chars.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    models = ["chars-256", "chars-512", "final", "untrained"]
    found = {(r["system"], r["task"], r["readout"]) for r in results["rows"]}
    # The plain readouts: concat_hidden is left out of the suite (its docstring says why).
    assert SUITE_READOUTS == ("final_cell", "final_hidden", "mean_hidden", "max_hidden")
    assert found == {(m, t, r) for m in models for t in ("sst", "imdb") for r in SUITE_READOUTS} | {
        ("tfidf", "sst", "word 1-2 grams"), ("tfidf", "imdb", "word 1-2 grams")}
    assert results["skipped"] == [{"system": "demo", "reason": f"no trained model in --demo_model_dir "
                                   f"'{tmp_path / 'no_demo'}' (make train writes one to runs/cpu_demo)"}]
    for (system, task) in {(r["system"], r["task"]) for r in results["rows"]}:
        group = [r for r in results["rows"] if (r["system"], r["task"]) == (system, task)]
        chosen = [r for r in group if r["chosen_on_val"]]
        assert len(chosen) == 1 and chosen[0]["val_accuracy"] == max(r["val_accuracy"] for r in group)
        # The full test set is for the final model and TF-IDF, not for every milestone or neural baseline.
        assert ("final_test_accuracy" in chosen[0]) == (task == "imdb" and system in ("final", "tfidf"))
    assert results["tasks"]["imdb"]["final_test"]["size"] == 40 and results["tasks"]["imdb"]["train"]["size"] == 30
    systems = {s["name"]: s for s in results["systems"]}
    assert [systems[m]["chars"] for m in models] == [256, 512, 1024, None]
    bpc = [systems[m]["bpc"]["val_bpc"] for m in models[:3]]
    assert bpc[0] > bpc[2] and "bpc" not in systems["untrained"]
    table = (out / "results.md").read_text()
    assert "## imdb (train 30, val 20, test 20, final_test 40)" in table and "| chars-512 | 512 |" in table
    assert "TF-IDF (C=" in table and "Skipped: demo" in table and "concat_hidden" not in table
    assert "| model | characters | val BPC | final_cell | final_hidden | mean_hidden | max_hidden | chosen on val |" \
        in table
    # Every model reads 3 + 3 splits; the final model's IMDB test set is the first reviews of its full
    # one (read once, sliced).
    assert first.stdout.count("featurised") == 4 * (3 + 3) and "fits from the cache" not in first.stdout
    cached = sorted(p.name for p in (out / "features" / "final").iterdir())
    assert cached == ["bpc.json", "fits-imdb.json", "fits-sst.json", "imdb-final_test.npz", "imdb-train.npz",
                      "imdb-val.npz", "sst-test.npz", "sst-train.npz", "sst-val.npz"]
    assert sorted(np.load(out / "features" / "final" / "sst-val.npz").files) == sorted(
        ["key"] + [f"val/{r}" for r in SUITE_READOUTS])

    # Rerun, now with a demo model: every other model's features, fits and BPC and the untrained weights are
    # read back from the cache; only the demo (the final model under another name) is featurised and fitted.
    again = python(*args, f"--demo_model_dir={pretrained}", check=True, timeout=600)
    featurised = [line for line in again.stdout.splitlines() if "featurised" in line]
    assert len(featurised) == 6 and all(line.startswith("[transfer_suite] demo ") for line in featurised), again.stdout
    assert again.stdout.count("fits from the cache") == 8 and "recomputing" not in again.stderr
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["skipped"] == [] and {r["system"] for r in rerun["rows"]} == set(models) | {"demo", "tfidf"}
    same = [r for r in rerun["rows"] if r["system"] != "demo"]
    assert [(r["system"], r["test_accuracy"]) for r in same] == [(r["system"], r["test_accuracy"])
                                                                 for r in results["rows"]]
    demo = {(r["task"], r["readout"]): r["test_accuracy"] for r in rerun["rows"] if r["system"] == "demo"}
    final = {(r["task"], r["readout"]): r["test_accuracy"] for r in rerun["rows"] if r["system"] == "final"}
    assert demo["sst", "mean_hidden"] == final["sst", "mean_hidden"]  # the same weights: the same classifier
