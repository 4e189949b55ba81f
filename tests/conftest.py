"""Shared test helpers: paths, subprocess runners (plain and horovodrun), tiny data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session", autouse=True)
def fused_kernels() -> None:
    """The fused CPU kernels built (as `make setup` does), so every test runs the model as training does."""
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


TINY_MODEL_FLAGS = ["--hidden_size=32", "--embed_size=8", "--seq_length=32", "--batch_size_per_worker=4",
                    "--learning_rate=3e-3", "--batch_scaling=none", "--warmup_steps=2", "--log_every=5",
                    "--eval_every=0", "--eval_windows=4", "--intra_op_threads=1", "--inter_op_threads=1"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_data) -> Path:
    """A tiny model trained for 20 steps in one process, for the tools that read checkpoints."""
    model_dir = tmp_path_factory.mktemp("tiny_model")
    python("train.py", f"--model_dir={model_dir}", f"--data_dir={tiny_data}", "--train_steps=20",
           "--checkpoint_every=10", *TINY_MODEL_FLAGS, check=True)
    return model_dir
