"""files.py: a write is whole or absent, whoever else writes the same path; outputs are checked before work."""

import json
import os
import threading

import pytest

from horovod_mlstm import files

pytestmark = pytest.mark.unit


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    files.write_json(str(path), {"old": 1})
    with pytest.raises(RuntimeError):
        with files.replace_whole(str(path)) as f:
            f.write('{"new": ')
            raise RuntimeError("killed half way")
    assert json.loads(path.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["out.json"]


def test_concurrent_writers_never_mix_their_bytes(tmp_path):
    path = str(tmp_path / "out.bin")
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=files.write_bytes, args=(path, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert open(path, "rb").read() in payloads
    assert os.listdir(tmp_path) == ["out.bin"]


def test_json_is_strict_and_the_mode_is_the_users(tmp_path):
    path = files.write_json(str(tmp_path / "s.json"), {"a": float("nan"), "b": [float("inf"), 1.5]})
    assert json.loads(open(path).read()) == {"a": None, "b": [None, 1.5]}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("target, message", [
    ("dir", "is a directory"),
    ("missing/out.csv", "does not exist"),
])
def test_unwritable_outputs_are_one_line(tmp_path, target, message):
    (tmp_path / "dir").mkdir()
    with pytest.raises(files.NotWritable, match=message):
        files.check_writable(str(tmp_path / target), "--output")
    files.check_writable(str(tmp_path / "fine.csv"))


def test_make_dir_makes_parents_or_names_what_is_in_the_way(tmp_path):
    files.make_dir(str(tmp_path / "a" / "b"), "--model_dir")
    assert (tmp_path / "a" / "b").is_dir()
    files.make_dir(str(tmp_path / "a" / "b"), "--model_dir")  # already there: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(files.NotWritable, match=f"^cannot create --output_dir {tmp_path}/file/sub: Not a directory$"):
        files.make_dir(str(tmp_path / "file" / "sub"), "--output_dir")


def test_sha256_names_the_bytes(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    assert files.sha256(str(tmp_path / "a")) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
