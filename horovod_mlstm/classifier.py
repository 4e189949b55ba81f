"""The saved classifier: transfer fits and saves it, classify loads and applies it, and so can Python code:

    classifier = Classifier.load(path)   # horovod_mlstm.classifier
    probabilities = classifier.predict_proba(Featurizer(model_dir, **classifier.featurization).transform(texts))

It lives below both CLIs so that they (and any other code) share one file format and one prediction.

Two files make one classifier: classifier.npz (the arrays, read without pickle) and classifier.json
(everything else). They are replaced one after the other, so they are tied together: the JSON holds
the SHA-256 of the .npz, the .npz is written first and the JSON last, and `load` refuses a pair
whose hash does not match (a fit that stopped between the two renames, or one file copied over).
Version 1 files (written before that tie) are still read; a version-1 JSON beside a version-2 .npz
is the half-replaced pair, refused like a mismatch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os

import numpy as np
from absl import logging

from horovod_mlstm import files, modeldir
from horovod_mlstm.textfiles import InputError

FORMAT = "horovod_mlstm.classifier"
VERSION = 2  # 2: classifier.json holds the SHA-256 of classifier.npz
READABLE_VERSIONS = (1, 2)
JSON_NAME, WEIGHTS_NAME = "classifier.json", "classifier.npz"
ARRAYS = ("coef", "intercept", "mean", "scale")


@dataclasses.dataclass
class Classifier:
    """A linear classifier over standardised features, saved as classifier.npz + classifier.json.

    scores = ((features - mean) / scale) @ coef.T + intercept; two classes have one row of
    coefficients (the second label's log-odds), more classes one row each (softmax).
    """

    labels: list[str]
    coef: np.ndarray
    intercept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    info: dict  # C, units, featurization, checkpoint identity, top unit: the JSON's other fields

    @property
    def featurization(self) -> dict:
        return self.info["featurization"]

    def save(self, directory: str) -> str:
        """Writes the weights, then the JSON that names them by hash (each replaced whole); returns the JSON's path."""
        buffer = io.BytesIO()
        np.savez(buffer, version=np.array(VERSION), **{k: getattr(self, k) for k in ARRAYS})
        weights = buffer.getvalue()
        files.write_bytes(os.path.join(directory, WEIGHTS_NAME), weights)
        return files.write_json(os.path.join(directory, JSON_NAME),
                                {"format": FORMAT, "version": VERSION, "labels": self.labels,
                                 "weights_sha256": hashlib.sha256(weights).hexdigest(), **self.info})

    @classmethod
    def load(cls, path: str) -> "Classifier":
        """From classifier.json or the directory holding it (no pickle: arrays from .npz, the rest JSON)."""
        if os.path.isdir(path):
            path = os.path.join(path, JSON_NAME)
        try:
            with open(path) as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise InputError(f"{path}: no such classifier file") from None
        except (OSError, ValueError, RecursionError) as e:
            raise InputError(f"{path}: not a classifier file ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InputError(f"{path}: not a {FORMAT} file")
        version = meta.pop("version", None)
        if version not in READABLE_VERSIONS:
            raise InputError(f"{path}: classifier format version {version}, this horovod_mlstm reads versions "
                             f"{' and '.join(map(str, READABLE_VERSIONS))}; refit it with transfer")
        weights_path = os.path.join(os.path.dirname(path), WEIGHTS_NAME)
        try:
            with open(weights_path, "rb") as f:
                weights = f.read()
        except OSError as e:
            raise InputError(f"{weights_path}: unreadable classifier weights ({e.strerror or e})") from None
        recorded = meta.pop("weights_sha256", None)
        if version >= 2 and hashlib.sha256(weights).hexdigest() != recorded:
            raise InputError(f"{weights_path} is not the weights {path} was saved with (its SHA-256 differs: a fit "
                             "stopped between writing the two, or one was copied over); refit with transfer")
        try:
            with np.load(io.BytesIO(weights), allow_pickle=False) as arrays:
                weights_version = int(arrays["version"]) if "version" in arrays.files else 1
                coef, intercept, mean, scale = (arrays[k] for k in ARRAYS)
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{weights_path}: unreadable classifier weights ({e})") from None
        if weights_version != version:
            raise InputError(f"{weights_path} (version {weights_version}) is not the weights {path} (version "
                             f"{version}) was saved with: a fit stopped between writing the two; refit with transfer")
        if version == 1:
            logging.warning("%s is classifier format version 1, whose weights file is not tied to it by hash; "
                            "refit with transfer to have that checked", path)
        labels = meta.pop("labels", None)
        if not isinstance(labels, list) or len(labels) < 2:
            raise InputError(f"{path}: no labels (a classifier file lists its two or more labels)")
        meta.pop("format")
        return cls(labels, coef, intercept, mean, scale, meta)

    def check(self, featurizer) -> None:
        """Features from another checkpoint or featurisation would be silently meaningless: refuse them."""
        fitted, given = {**self.info["checkpoint"], "model_dir": self.info["model_dir"]}, featurizer.identity()
        if not modeldir.same_weights(fitted, given):
            raise InputError(f"the classifier was fitted on features of {modeldir.describe(fitted)}, "
                             f"not of {modeldir.describe(given)}")
        if featurizer.settings != self.featurization:
            raise InputError(f"the classifier was fitted on features made with {self.featurization}, "
                             f"not {featurizer.settings}")

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """[n, classes] probabilities, columns in the order of `labels`."""
        from scipy.special import expit, softmax

        if features.ndim != 2 or features.shape[1] != self.mean.size:
            raise InputError(f"features of shape {features.shape}: the classifier needs {self.mean.size} units")
        scores = ((features - self.mean) / self.scale) @ self.coef.T + self.intercept
        if len(self.labels) == 2:
            p = expit(scores[:, 0])
            return np.stack([1 - p, p], axis=1)
        return softmax(scores, axis=1)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.array(self.labels)[np.argmax(self.predict_proba(features), axis=1)]
