"""Atomic artifact writes (cm3leon.artifacts): a folder appears whole or not at all, and what a
killed writer leaves behind is cleaned up by the next one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cm3leon.artifacts import atomic_dir, atomic_write_json, folder_digest


def test_a_folder_replaces_the_old_one_only_when_whole(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("export failed")
    assert (target / "a.txt").read_text() == "one"  # the old artifact is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "model"
    code = (
        "import os, sys; from cm3leon.artifacts import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'half.bin').write_bytes(b'x')\n"
        "    os._exit(9)  # killed mid-export: no cleanup runs\n"
    )
    subprocess.run([sys.executable, "-c", code, str(target)], check=False)
    orphans = [p for p in tmp_path.iterdir() if p.name.startswith(".model.tmp-")]
    assert len(orphans) == 1 and not target.exists()
    live = tmp_path / f".model.tmp-{os.getpid()}-abc"  # a running writer's: must be kept
    live.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model"]


def test_folder_digest_follows_names_and_bytes_only(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        atomic_write_json(folder / "x" / "m.json", {"k": 1})
    assert folder_digest(a) == folder_digest(b)
    os.utime(b / "x" / "m.json", (0, 0))
    assert folder_digest(a) == folder_digest(b)
    atomic_write_json(b / "x" / "m.json", {"k": 2})
    assert folder_digest(a) != folder_digest(b)
    (a / "x" / "m.json").rename(a / "x" / "n.json")
    atomic_write_json(b / "x" / "m.json", {"k": 1})
    assert folder_digest(a) != folder_digest(b)  # same bytes, another name
