"""Publishing a data directory: one run's complete output, always; leftovers of dead runs cleaned up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ENV, REPO, write_shards
from horovod_mlstm.records import (DataError, make_staging, publish, remove_dead_staging, split_shards,
                                   write_corpus)


def listed(data_dir) -> set[str]:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return {s["file"] for split in manifest["splits"].values() for s in split["shards"]}


@pytest.mark.unit
def test_publish_replaces_the_old_output_and_removes_its_shards(tmp_path):
    write_corpus([f"first run review {i}" for i in range(50)], str(tmp_path), num_shards=2)
    first = listed(tmp_path)
    write_corpus([f"second run review {i}" for i in range(50)], str(tmp_path), num_shards=3)
    second = listed(tmp_path)
    assert not first & second and len(second) == 9
    on_disk = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.tfrecord")}
    assert on_disk == second  # the first run's shards are gone, nothing else is left
    assert sorted(os.listdir(tmp_path)) == [".lock", "manifest.json", next(iter(second)).split("/")[0]]


@pytest.mark.unit
def test_the_layout_before_manifest_version_2_is_replaced_too(tmp_path):
    (tmp_path / "train-00000-of-00001.tfrecord").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("the user's own file")
    write_corpus(["a review"], str(tmp_path))
    assert not (tmp_path / "train-00000-of-00001.tfrecord").exists()
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"


@pytest.mark.unit
def test_replace_false_keeps_what_is_published(tmp_path):
    write_shards(tmp_path, {"train": [[b"first"]]})
    staging = make_staging(str(tmp_path))
    assert publish(staging, str(tmp_path), {"splits": {}}, replace=False) is False
    assert not os.path.exists(staging)
    assert [s.bytes for s in split_shards(str(tmp_path), "train")] == [5]


@pytest.mark.cli
def test_staging_of_dead_runs_is_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited
    host = os.uname().nodename.replace("-", "_")
    stale = tmp_path / f".staging-{host}-{pid}-deadbeef"
    stale.mkdir()
    (stale / "part-train-00000").write_bytes(b"x" * 1000)
    mine = make_staging(str(tmp_path))  # also sweeps
    other_host = tmp_path / f".staging-otherhost-{pid}-cafecafe"
    other_host.mkdir()
    assert not stale.exists() and os.path.exists(mine)
    assert remove_dead_staging(str(tmp_path)) == []  # ours is alive; another host's is not ours to judge
    assert other_host.exists()


@pytest.mark.unit
def test_unwritable_output_is_one_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(DataError, match="cannot create output directory"):
        make_staging(str(tmp_path / "file" / "out"))


@pytest.mark.multiproc
def test_concurrent_runs_leave_one_runs_complete_output(tmp_path):
    """Several processes publish into one directory at once; the lock keeps the result consistent."""
    script = ("import sys; from horovod_mlstm.records import write_corpus\n"
              "for i in range(4): write_corpus([f'run {sys.argv[1]} round {i} review {j}' for j in range(200)], "
              f"{str(tmp_path)!r}, num_shards=4)")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)], cwd=REPO, env=ENV) for n in range(3)]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    # every listed shard exists with the listed size (split_shards checks), and nothing else is there
    assert sum(len(split_shards(str(tmp_path), split)) for split in ("train", "val", "test")) == 12
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.tfrecord")} == listed(tmp_path)
