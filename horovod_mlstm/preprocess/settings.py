"""What a preprocess run is asked to do, and the one check of it.

Options is what a worker needs to turn a chunk into records; check_settings refuses the
flag values that cannot work, one line each, before any input is read.
"""

from __future__ import annotations

import dataclasses

FORMATS = ("auto", "amazon_json", "csv", "text")
MB = 1 << 20
EVAL_FRACTION_CAP = 0.1  # --min_eval_bytes never raises --val_fraction or --test_fraction above this
BUCKET = 1e-4  # resolution of the histogram of bytes over split positions h < 2 * EVAL_FRACTION_CAP
BUCKETS = round(2 * EVAL_FRACTION_CAP / BUCKET)


class PreprocessError(Exception):
    """A fatal input problem, explained in one line naming the file (and line)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a worker needs to turn a chunk into records."""

    num_shards: int
    val_fraction: float
    test_fraction: float
    text_field: str = "reviewText"
    csv_column: str = "sentence"
    text_whole_file: bool = False
    max_record_bytes: int = 16 * MB
    chunk_bytes: int = 32 * MB


def check_settings(num_shards: int, workers: int, max_bad_fraction: float, val_fraction: float,
                   test_fraction: float, min_eval_bytes: int, max_record_bytes: int, chunk_mb: float) -> None:
    """Flag values that cannot work are one line each, before any input is read."""
    if num_shards < 1:
        raise PreprocessError(f"--num_shards must be at least 1, got {num_shards}")
    if workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {workers}")
    if not 0 <= max_bad_fraction <= 1:
        raise PreprocessError(f"--max_bad_fraction must be from 0 to 1, got {max_bad_fraction}")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise PreprocessError("--val_fraction and --test_fraction must be >= 0 and sum to less than 1")
    if min_eval_bytes < 0:
        raise PreprocessError(f"--min_eval_bytes must be >= 0, got {min_eval_bytes}")
    if max_record_bytes < 1024:
        raise PreprocessError(f"--max_record_bytes must be at least 1024, got {max_record_bytes}")
    if not chunk_mb * MB >= 1024:
        raise PreprocessError(f"--chunk_mb must be at least 0.001 (1 KB), got {chunk_mb}")
