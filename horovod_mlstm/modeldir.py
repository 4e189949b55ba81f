"""The model directory: the one module that creates, locks, names and loads it.

    MODEL_DIR/config.json            the architecture (model.ModelConfig), written before any checkpoint
    MODEL_DIR/checkpoints/           model, optimizer and counters (checkpoint.Checkpointer), per-rank RNN state
    MODEL_DIR/milestones/chars-N/    the model alone when training had seen N characters: a model dir of its own
    MODEL_DIR/summary.json           what the last training run did (train.py)
    MODEL_DIR/.lock                  held by the one job that writes here

Training creates a model dir with `create` and holds its `lock` while it runs; anything else that makes
one (a milestone, an imported release, an untrained baseline) writes it whole with `write_model`. Every
reader restores through `load`, and names the weights it read with `identity`, which classifiers and
feature caches store so that features of one checkpoint are never taken for another's.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile

from absl import logging

from horovod_mlstm import files
from horovod_mlstm.checkpoint import CheckpointError, Checkpointer
from horovod_mlstm.model import LanguageModel, ModelConfig, build_model

CONFIG = "config.json"
LOCK = ".lock"
IDENTITY_KEYS = ("checkpoint", "index_sha256", "config_sha256")  # what names the weights, wherever they are


class ModelDirBusy(CheckpointError):
    """Another live process holds the model dir's lock; `token` names the job it belongs to."""

    def __init__(self, message: str, token: str = ""):
        super().__init__(message)
        self.token = token


# ---------------------------------------------------------------- config

def write_config(model_dir: str, config: ModelConfig) -> None:
    files.write_json(os.path.join(model_dir, CONFIG), dataclasses.asdict(config))


def read_config(model_dir: str) -> ModelConfig:
    """The architecture a model dir holds; FileNotFoundError or ValueError in one line otherwise."""
    path = os.path.join(model_dir, CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trained model in {model_dir!r} (missing {CONFIG})")
    try:
        with open(path) as f:
            return ModelConfig(**json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:  # half-written by hand, or foreign
        raise ValueError(f"{path} is not a model config written by this project ({e})") from None


# ---------------------------------------------------------------- creating and locking

def loss_scaled(precision: str) -> bool:
    """Whether training in PRECISION wraps the optimizer in a loss scale (and its checkpoints hold one)."""
    return precision == "mixed_float16"


def create(model_dir: str, config: ModelConfig) -> None:
    """Makes MODEL_DIR for a model of CONFIG, or checks that the one there is that model; ValueError otherwise.

    A model may continue in another precision (its weights are float32 in every precision), so one
    trained where bf16 is native continues in fp32 elsewhere, except across float16's loss scale,
    which changes what a checkpoint holds."""
    if os.path.exists(os.path.join(model_dir, CONFIG)):
        saved = read_config(model_dir)
        if dataclasses.replace(saved, precision=config.precision) != config:
            raise ValueError(f"--model_dir {model_dir} holds a different model ({saved}); the flags ask for "
                             f"{config}. Use another --model_dir.")
        if loss_scaled(saved.precision) != loss_scaled(config.precision):
            raise ValueError(f"--model_dir {model_dir} was trained with --precision={saved.precision}, whose "
                             f"checkpoints {'hold' if loss_scaled(saved.precision) else 'lack'} float16's loss scale; "
                             f"continue it with --precision={saved.precision}")
    files.make_dir(model_dir, "--model_dir")


class Lock:
    """An exclusive lock on MODEL_DIR/.lock for as long as this process lives (or until `release`).

    flock(2): the kernel drops it when its holder dies, so a job killed with -9 never blocks its
    restart. On NFS, Linux maps flock to the server's byte-range locks: a lock held on another node
    blocks as it should, and one left by a node that crashed is dropped when its lease runs out
    (90 s by default for NFSv4). The file holds who has the lock, for the refusal's message.
    """

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, LOCK)
        self.file = None

    def acquire(self, token: str = "") -> "Lock":
        """Takes the lock for the job named TOKEN, or raises ModelDirBusy naming the holder (host, pid,
        since when, command) and carrying its job's token."""
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            try:
                holder = json.loads(holder)
                who = f"pid {holder['pid']} on {holder['host']} since {holder['since']} ({holder['command'][:120]})"
            except (ValueError, KeyError, TypeError):
                holder, who = {}, "another process"
            raise ModelDirBusy(f"--model_dir {os.path.dirname(self.path)} is in use by {who}; two jobs must not "
                               "train one model dir (stop that job first, or use another --model_dir)",
                               holder.get("job", "")) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": token,
                            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                            "command": " ".join(sys.argv)}))
        f.flush()
        self.file = f
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor drops the flock
            self.file = None


# ---------------------------------------------------------------- writing and reading whole models

def write_model(model_dir: str, model: LanguageModel, step: int, info_file: str = "", info: dict | None = None,
                replace: bool = True) -> str:
    """Writes MODEL_DIR whole: config.json, one checkpoint of the model alone at STEP, and INFO as
    INFO_FILE (e.g. milestone.json). It is built beside MODEL_DIR and renamed into place, so a reader
    never finds half of it. A model dir already there is replaced, or with replace=False the rename
    fails (OSError) unless MODEL_DIR is missing or empty."""
    parent = os.path.dirname(os.path.abspath(model_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(model_dir))}.", dir=parent)
    try:
        write_config(staging, model.config)
        Checkpointer(staging, keep=1, model=model).save(step)
        if info_file:
            files.write_json(os.path.join(staging, info_file), info or {})
        if replace and os.path.exists(model_dir):
            shutil.rmtree(model_dir)
        os.rename(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after the rename
    return model_dir


def load(model_dir: str, precision: str = "") -> tuple[LanguageModel, str]:
    """(the model MODEL_DIR/config.json describes, restored from its newest readable checkpoint; that checkpoint).

    PRECISION, when given, replaces the config's mixed-precision policy (fine-tuning chooses its own).
    """
    config = read_config(model_dir)
    model = build_model(dataclasses.replace(config, precision=precision) if precision else config)
    path = Checkpointer(model_dir, writer=False, model=model).restore(expect_partial=True)
    if path is None:
        raise CheckpointError(f"no checkpoint in {os.path.join(model_dir, 'checkpoints')}")
    return model, path


def checkpoint_value(checkpoint: str, name: str) -> int | None:
    """A counter train.py saves with its checkpoints (step, streams, chars_seen), or None where there is none."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(checkpoint)
    key = f"{name}/.ATTRIBUTES/VARIABLE_VALUE"
    return int(reader.get_tensor(key)) if reader.has_tensor(key) else None


def milestone_dir(model_dir: str, chars: int) -> str:
    return os.path.join(model_dir, "milestones", f"chars-{chars}")


# ---------------------------------------------------------------- naming the weights

def identity(model_dir: str, checkpoint: str) -> dict:
    """What features depend on: the checkpoint's name and hashes of its .index and of config.json.

    The .index file lists every variable's shape and the checksum of its saved bytes, so its hash
    changes with any weight; hashing it is cheap even for a 4096-unit model.
    """
    return {"model_dir": os.path.abspath(model_dir), "checkpoint": os.path.basename(checkpoint),
            "index_sha256": files.sha256(checkpoint + ".index"),
            "config_sha256": files.sha256(os.path.join(model_dir, CONFIG))}


def same_weights(a: dict, b: dict) -> bool:
    """Two identities name the same weights (wherever the model dir has been moved to)."""
    return all(a.get(k) == b.get(k) for k in IDENTITY_KEYS)


def describe(identity_: dict) -> str:
    return (f"{identity_.get('model_dir')} ({identity_.get('checkpoint')}, "
            f"index {str(identity_.get('index_sha256'))[:12]})")


# ---------------------------------------------------------------- a job's summary

def earlier_history(directory: str, step: int) -> list[dict]:
    """The validation points of earlier runs up to STEP, from DIRECTORY/summary.json (train's model dir,
    finetune's output dir): a resumed job keeps its curve."""
    try:
        with open(os.path.join(directory, "summary.json")) as f:
            return [h for h in json.load(f).get("history", []) if h["step"] <= step]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as e:
        logging.warning("%s/summary.json is unreadable (%s); the earlier validation history is not kept", directory, e)
        return []
