"""tasks.py: labelled CSV tasks, and the warning when an evaluation split repeats training texts."""

import csv

import pytest

from horovod_mlstm.tasks import csv_task, overlap_warnings

pytestmark = pytest.mark.unit


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("label", "text"), *rows])
    return str(path)


def test_an_evaluation_split_that_repeats_training_texts_is_named_with_its_count(tmp_path):
    train = write_csv(tmp_path / "train.csv", [(i % 2, f"review {i}") for i in range(50)])
    val = write_csv(tmp_path / "val.csv", [(i % 2, f"review {i}") for i in range(45, 65)])  # 5 shared
    test = write_csv(tmp_path / "test.csv", [(i % 2, f"other {i}") for i in range(20)])
    task = csv_task("t", {"train": train, "val": val, "test": test}, "text", "label")
    assert overlap_warnings(task) == [f"warning: 5 of 20 val texts ({val}) are also training texts ({train}); "
                                      "its accuracy is not a held-out result"]
    same = csv_task("t", {"train": train, "val": test, "test": train}, "text", "label")
    assert [line.split(" (")[0] for line in overlap_warnings(same)] == ["warning: 50 of 50 test texts"]
