"""Publishing a data directory: one run's complete output, always; leftovers of dead runs cleaned up."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ENV, REPO, write_shards
from horovod_mlstm.records import (DataError, clean, make_staging, publish, remove_dead_staging, remove_staging,
                                   split_shards, write_corpus, write_tfrecords)


def listed(data_dir) -> set[str]:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return {s["file"] for split in manifest["splits"].values() for s in split["shards"]}


@pytest.mark.unit
def test_tfrecords_are_written_as_tensorflow_writes_them(tmp_path):
    import tensorflow as tf

    records = [b"", b"a", "caf\u00e9 \U0001f600\n".encode(), bytes(range(256)) * 300]
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
        for record in records:
            writer.write(record)
    with open(tmp_path / "ours.tfrecord", "wb") as f:
        write_tfrecords(f, records)
    assert (tmp_path / "ours.tfrecord").read_bytes() == (tmp_path / "tf.tfrecord").read_bytes()
    assert [r.numpy() for r in tf.data.TFRecordDataset([str(tmp_path / "ours.tfrecord")])] == records


@pytest.mark.unit
def test_clean_folds_what_the_whitespace_regex_folds():
    samples = ["  a \t b\n\x1c c\u3000d\u00a0 ", "", "   ", "x", "\u2028a\u2029b\x85", "<b>bold</b>&amp;\r\n"]
    for text in samples:
        assert clean(text) == re.sub(r"\s+", " ", re.sub(r"<[^>]{0,200}>", " ", html.unescape(text))).strip()
    assert all(chr(c).isspace() == bool(re.fullmatch(r"\s", chr(c))) for c in range(sys.maxunicode + 1))


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
def test_publishing_removes_only_what_the_replaced_manifest_listed(tmp_path):
    write_corpus([f"first run review {i}" for i in range(50)], str(tmp_path), num_shards=2)
    old_dir = tmp_path / next(iter(listed(tmp_path))).split("/")[0]
    (old_dir / "notes.txt").write_text("the user's, inside the old shards directory")
    (tmp_path / "shards-mine").mkdir()
    (tmp_path / "shards-mine" / "train-00000-of-00001.tfrecord").write_bytes(b"the user's own")
    (tmp_path / "val-00000-of-00001.tfrecord").write_bytes(b"the user's too")
    write_corpus([f"second run review {i}" for i in range(50)], str(tmp_path), num_shards=2)
    assert [p.name for p in old_dir.iterdir()] == ["notes.txt"]  # the old shards are gone, not the user's file
    assert (tmp_path / "shards-mine" / "train-00000-of-00001.tfrecord").read_bytes() == b"the user's own"
    assert (tmp_path / "val-00000-of-00001.tfrecord").read_bytes() == b"the user's too"


@pytest.mark.unit
def test_the_layout_before_manifest_version_2_is_replaced_by_what_its_manifest_listed(tmp_path):
    """Version 1 kept the shards beside manifest.json, which listed them without a directory."""
    names = {split: f"{split}-00000-of-00001.tfrecord" for split in ("train", "val", "test")}
    for name in names.values():
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {split: {"reviews": 0, "bytes": 0, "shards": [
        {"file": name, "reviews": 0, "bytes": 0}]} for split, name in names.items()}}))
    (tmp_path / "train-00001-of-00002.tfrecord").write_bytes(b"not listed: the user's")
    write_corpus(["a review"], str(tmp_path))
    assert not any((tmp_path / name).exists() for name in names.values())
    assert (tmp_path / "train-00001-of-00002.tfrecord").read_bytes() == b"not listed: the user's"


@pytest.mark.unit
@pytest.mark.parametrize("name", ["../outside.tfrecord", "/tmp/x.tfrecord", "shards-a/../../outside.tfrecord"])
def test_a_shard_outside_the_data_directory_is_refused(tmp_path, name):
    data = tmp_path / "data"
    write_corpus([f"review {i}" for i in range(20)], str(data))
    (tmp_path / "outside.tfrecord").write_bytes(b"not the data's")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["file"] = name
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as caught:
        split_shards(str(data), "train")
    assert str(caught.value) == (f"{data}/manifest.json lists a shard outside {str(data)!r}: {name!r}; the manifest "
                                 "is damaged or foreign, rerun preprocess")
    write_corpus(["a new review"], str(data))  # replacing it removes nothing outside
    assert (tmp_path / "outside.tfrecord").read_bytes() == b"not the data's"


@pytest.mark.unit
def test_replace_false_keeps_what_is_published(tmp_path):
    write_shards(tmp_path, {"train": [[b"first"]]})
    staging = make_staging(str(tmp_path))
    assert publish(staging, str(tmp_path), {"splits": {}}, replace=False) is False
    assert not os.path.exists(staging)
    assert [s.bytes for s in split_shards(str(tmp_path), "train")] == [5]


OWNER = ("import sys; from horovod_mlstm.records import make_staging; print(make_staging(sys.argv[1]), flush=True); "
         "sys.stdin.read()")  # holds its staging directory until its stdin closes


def staging_owner(output_dir, *prefix) -> tuple[subprocess.Popen, str]:
    """A process (started by `prefix`, e.g. in a new pid namespace) that made a staging dir and lives on."""
    proc = subprocess.Popen([*prefix, sys.executable, "-c", OWNER, str(output_dir)], cwd=REPO, env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


@pytest.mark.multiproc
def test_staging_of_dead_runs_is_removed_and_live_ones_kept(tmp_path):
    """Ownership is the owner's lock, not its host and pid, which containers on one network share."""
    live, live_dir = staging_owner(tmp_path)
    dead, dead_dir = staging_owner(tmp_path)
    dead.kill()
    dead.wait()
    (tmp_path / ".staging-leftover").mkdir()  # no owner file: a run killed before it locked, or an older version
    mine = make_staging(str(tmp_path))  # sweeps
    assert sorted(p.name for p in tmp_path.glob(".staging-*")) == sorted(os.path.basename(p) for p in (live_dir, mine))
    assert remove_dead_staging(str(tmp_path)) == []
    live.stdin.close()
    assert live.wait(60) == 0
    assert remove_dead_staging(str(tmp_path)) == [live_dir]  # its owner exited without cleaning up
    remove_staging(mine)
    assert not list(tmp_path.glob(".staging-*"))


@pytest.mark.multiproc
@pytest.mark.needs_root
def test_a_run_in_another_pid_namespace_is_judged_by_its_lock(tmp_path):
    """As in a container: the owner is pid 1 of its namespace, alive or not; its lock tells."""
    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a pid namespace here (unshare --pid)")
    live, live_dir = staging_owner(tmp_path, "unshare", "--pid", "--fork")
    dead, dead_dir = staging_owner(tmp_path, "unshare", "--pid", "--fork")
    dead.stdin.close()
    assert dead.wait(60) == 0
    assert remove_dead_staging(str(tmp_path)) == [dead_dir]
    assert os.path.isdir(live_dir)
    live.stdin.close()
    live.wait(60)


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
