"""The one atomic write (hiseg.utils.atomic_io): all or nothing, mode of a new file, its temp names."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from hiseg.utils.atomic_io import atomic_save_png, atomic_write, atomic_write_json, temp_file_pattern


def test_a_failing_block_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_writes_create_folders_follow_the_umask_and_name_temp_files(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    seen = []
    old = os.umask(0o027)
    try:
        with atomic_write(path, "w") as f:
            seen = os.listdir(path.parent)
            f.write("{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}" and path.stat().st_mode & 0o777 == 0o640
    assert len(seen) == 1 and temp_file_pattern(r"x\.json").match(seen[0])
    assert not temp_file_pattern(r"y\.json").match(seen[0])


def test_json_and_png(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": [1, 2]}, indent=1)
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1, 2]}
    label = np.array([[0, 255], [3, 7]], np.uint8)
    atomic_save_png(tmp_path / "l.png", label)
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), label)
    with pytest.raises(ValueError, match="2-D uint8"):
        atomic_save_png(tmp_path / "bad.png", label.astype(np.int32))
    assert sorted(os.listdir(tmp_path)) == ["l.png", "r.json"]


def test_fsync_for_records_not_for_bulk_label_maps(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert len(synced) == 1
    atomic_save_png(tmp_path / "b.png", np.zeros((4, 5), np.uint8))
    assert len(synced) == 1  # label maps: atomic, not flushed one by one
    assert np.asarray(Image.open(tmp_path / "b.png")).shape == (4, 5)
    with atomic_write(tmp_path / "c.bin", fsync=False) as f:
        f.write(b"abc")
    assert len(synced) == 1 and (tmp_path / "c.bin").read_bytes() == b"abc"
