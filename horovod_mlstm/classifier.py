"""The saved classifier: transfer fits and saves it, classify loads and applies it, and so can Python code:

    classifier = Classifier.load(path)   # horovod_mlstm.classifier
    probabilities = classifier.predict_proba(Featurizer(model_dir, **classifier.featurization).transform(texts))

It lives below both CLIs so that they (and any other code) share one file format and one prediction.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from horovod_mlstm.textfiles import InputError

FORMAT = "horovod_mlstm.classifier"
VERSION = 1
JSON_NAME, WEIGHTS_NAME = "classifier.json", "classifier.npz"


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
        """Writes both files (each replaced whole, never half-written); returns the JSON's path."""
        weights = os.path.join(directory, WEIGHTS_NAME)
        with open(weights + ".tmp", "wb") as f:
            np.savez(f, coef=self.coef, intercept=self.intercept, mean=self.mean, scale=self.scale)
        os.replace(weights + ".tmp", weights)
        return write_json(os.path.join(directory, JSON_NAME),
                          {"format": FORMAT, "version": VERSION, "labels": self.labels, **self.info})

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
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: not a classifier file ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InputError(f"{path}: not a {FORMAT} file")
        if meta.get("version") != VERSION:
            raise InputError(f"{path}: classifier format version {meta.get('version')}, this horovod_mlstm reads "
                             f"version {VERSION}; refit it with transfer")
        weights = os.path.join(os.path.dirname(path), WEIGHTS_NAME)
        try:
            with np.load(weights, allow_pickle=False) as arrays:
                coef, intercept, mean, scale = (arrays[k] for k in ("coef", "intercept", "mean", "scale"))
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{weights}: unreadable classifier weights ({e})") from None
        labels = meta.pop("labels")
        for key in ("format", "version"):
            meta.pop(key)
        return cls(labels, coef, intercept, mean, scale, meta)

    def check(self, featurizer) -> None:
        """Features from another checkpoint or featurisation would be silently meaningless: refuse them."""
        from horovod_mlstm.inference import describe_checkpoint, same_checkpoint

        fitted, given = {**self.info["checkpoint"], "model_dir": self.info["model_dir"]}, featurizer.identity()
        if not same_checkpoint(fitted, given):
            raise InputError(f"the classifier was fitted on features of {describe_checkpoint(fitted)}, "
                             f"not of {describe_checkpoint(given)}")
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


def write_json(path: str, value) -> str:
    """Replaces PATH whole with VALUE as JSON, so a crash never leaves half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)
    return path
