"""Shared test helpers: paths, subprocess runners (plain and horovodrun), tiny data, and the test tiers.

Every test carries exactly one tier marker, by module (`pytestmark`) or on the test itself:

    unit       runs in the pytest process                         make test-fast (minutes)
    cli        starts one project process (python -m ..., train.py, a launcher)
    multiproc  several processes: horovodrun/mpirun jobs, signals and kill -9 between processes
    cluster    hosts in network namespaces (needs root)

`make test` runs every tier. A `cluster` test, or one marked `needs_root` (tmpfs, dropped capabilities),
skips with its reason where the suite does not run as root, and fails where it does but skipped anyway.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
PYTHON = sys.executable
HOROVODRUN = str(Path(PYTHON).parent / "horovodrun")

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def run(args: list[str], timeout: float = 600, cwd: Path | str = REPO, env: dict | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """Runs a command, returns it with stdout/stderr text; fails the test with its output if check."""
    proc = subprocess.run(args, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def python(*args: str, **kw) -> subprocess.CompletedProcess:
    """`python ARGS` with the test interpreter (the project's venv)."""
    return run([PYTHON, *args], **kw)


def horovodrun(np: int, *args: str, **kw) -> subprocess.CompletedProcess:
    """`horovodrun -np N -H localhost:N python ARGS`: a real multi-process Horovod job."""
    return run([HOROVODRUN, "-np", str(np), "-H", f"localhost:{np}", PYTHON, *args], **kw)


def model_weights(model_dir) -> dict[str, np.ndarray]:
    """The model's variables from the newest checkpoint, by checkpoint key."""
    import tensorflow as tf

    path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith("model/") and "OPTIMIZER_SLOT" not in k}


def assert_same_weights(a, b, rtol=1e-5, atol=1e-6):
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys() and len(wa) >= 8
    for key in wa:
        np.testing.assert_allclose(wa[key], wb[key], rtol=rtol, atol=atol, err_msg=key)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


TIERS = ("unit", "cli", "multiproc", "cluster")


def pytest_configure(config):
    for tier, what in zip(TIERS, ("in the pytest process", "one project process", "several processes",
                                  "network-namespace hosts")):
        config.addinivalue_line("markers", f"{tier}: test tier: {what}")
    config.addinivalue_line("markers", "needs_root: needs root (namespaces, mounts); a skip under root fails")


def pytest_collection_modifyitems(config, items):
    """Every test has exactly one tier marker, so that `-m unit` and friends select what they say."""
    wrong = [f"{item.nodeid} ({', '.join(tiers) or 'no tier'})" for item in items
             if len(tiers := [m.name for m in item.iter_markers() if m.name in TIERS]) != 1]
    if wrong:
        raise pytest.UsageError("tests need exactly one tier marker of " + ", ".join(TIERS) + ":\n  "
                                + "\n  ".join(wrong))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under root, a needs_root test that skipped hides a failure: report it as one."""
    outcome = yield
    report = outcome.get_result()
    needs_root = item.get_closest_marker("needs_root") or item.get_closest_marker("cluster")
    if report.skipped and os.geteuid() == 0 and needs_root and call.when != "teardown":
        report.outcome = "failed"
        report.longrepr = f"needs_root test skipped although the suite runs as root: {call.excinfo.value}"


@pytest.fixture(scope="session")
def fused_kernels() -> None:
    """The fused CPU kernels built (as `make setup` does), so a test runs the model as training does."""
    from horovod_mlstm import kernels

    kernels.build()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared is absent ({SHARED}): this clone is outside the project workspace")
    return SHARED


def write_shards(out: Path, shards: dict[str, list[list[bytes]]]) -> Path:
    """A published data dir whose shards hold exactly the given records, in order: {split: [shard records]}."""
    import tensorflow as tf

    from horovod_mlstm.records import SPLITS, make_staging, publish, shard_name

    staging = make_staging(str(out))
    splits = {}
    for split in SPLITS:
        entries = []
        for i, records in enumerate(shards.get(split, [])):
            name = shard_name(split, i, len(shards[split]))
            with tf.io.TFRecordWriter(os.path.join(staging, name)) as writer:
                for record in records:
                    writer.write(record)
            entries.append({"file": name, "reviews": len(records), "bytes": sum(map(len, records))})
        splits[split] = {"reviews": sum(e["reviews"] for e in entries), "bytes": sum(e["bytes"] for e in entries),
                         "shards": entries}
    publish(staging, str(out), {"splits": splits})
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small built-in-corpus data dir (2 shards per split), written once per session."""
    from horovod_mlstm import corpus
    from horovod_mlstm.records import write_corpus

    out = tmp_path_factory.mktemp("tiny_data")
    write_corpus(corpus.texts(3000, seed=1), str(out), num_shards=2, val_fraction=0.1, test_fraction=0.1)
    return out


# fp32 explicitly: the default (auto) depends on the CPU, and the tests' exact comparisons must not.
TINY_MODEL_FLAGS = ["--hidden_size=32", "--embed_size=8", "--seq_length=32", "--batch_size_per_worker=4",
                    "--precision=fp32", "--learning_rate=3e-3", "--batch_scaling=none", "--warmup_steps=2", "--log_every=5",
                    "--eval_every=0", "--eval_windows=4", "--intra_op_threads=1", "--inter_op_threads=1"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_data) -> Path:
    """A tiny model trained for 20 steps in one process, for the tools that read checkpoints."""
    model_dir = tmp_path_factory.mktemp("tiny_model")
    python("train.py", f"--model_dir={model_dir}", f"--data_dir={tiny_data}", "--train_steps=20",
           "--checkpoint_every=10", *TINY_MODEL_FLAGS, check=True)
    return model_dir


def fitted_classifier(work: Path, model_dir, label_of, reviews: int, seed: int, *transfer_flags: str) -> Path:
    """WORK/out: a classifier `transfer` fitted with MODEL_DIR on train/val/test CSVs (label, text) of
    synthetic reviews, labelled by LABEL_OF(stars)."""
    from horovod_mlstm import corpus  # the project imports only where a test uses it

    paths = {}
    for offset, split in enumerate(("train", "val", "test")):
        paths[split] = work / f"{split}.csv"
        with open(paths[split], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "text"])
            writer.writerows((label_of(int(r["overall"])), r["reviewText"])
                             for r in corpus.reviews(reviews, seed=seed + offset))
    python("-m", "horovod_mlstm.transfer", f"--model_dir={model_dir}", f"--train={paths['train']}",
           f"--val={paths['val']}", f"--test={paths['test']}", "--text_column=text", f"--output_dir={work / 'out'}",
           *transfer_flags, check=True)
    return work / "out"
