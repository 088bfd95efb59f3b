"""Atomic writes: a failure leaves the old content, a race keeps one complete copy."""

from __future__ import annotations

import os

import pytest

from rlflow.utils.atomic import atomic_file, atomic_folder, remove_stale_temporaries, write_text


def test_write_text_replaces_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    write_text(str(path), "old")
    with pytest.raises(RuntimeError):
        with atomic_file(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("crash while writing")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]
    write_text(str(path), "new")
    assert path.read_text() == "new"


def test_folder_is_complete_or_absent(tmp_path):
    target = tmp_path / "model"

    def fail(folder):
        open(os.path.join(folder, "part"), "w").close()
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_folder(str(target), fail)
    assert os.listdir(tmp_path) == []

    atomic_folder(str(target), lambda d: open(os.path.join(d, "a"), "w").close())
    assert sorted(os.listdir(target)) == ["a"]
    # A second builder loses the race quietly and leaves the first copy as it was.
    atomic_folder(str(target), lambda d: open(os.path.join(d, "b"), "w").close())
    assert sorted(os.listdir(target)) == ["a"]
    # replace=True swaps in the new copy.
    atomic_folder(str(target), lambda d: open(os.path.join(d, "b"), "w").close(), replace=True)
    assert sorted(os.listdir(target)) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    (tmp_path / ".global_step_3.tmp-ab12").mkdir()
    (tmp_path / ".metrics.jsonl.tmp-cd34").write_text("x")
    (tmp_path / "global_step_2").mkdir()
    (tmp_path / ".hidden").write_text("user file")
    removed = remove_stale_temporaries(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [".global_step_3.tmp-ab12", ".metrics.jsonl.tmp-cd34"]
    assert sorted(os.listdir(tmp_path)) == [".hidden", "global_step_2"]
