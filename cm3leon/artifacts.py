"""Atomic artifact writes (DESIGN.md §3: a crash never leaves an artifact that looks complete).

Every file or folder an artifact consists of is written under a temporary name beside its final
path and moved into place with ``os.replace``, which is atomic on POSIX file systems. A folder
that already exists at the destination is swapped out and removed only after the new one is in
place.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def folder_digest(folder: str | Path) -> str:
    """sha256 hex over every file under ``folder``: its relative path and its bytes' sha256,
    in sorted order — equal folders, equal digests, whatever the file times."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``path`` when the block succeeds.

    On an exception the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; artifacts get the usual mode
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _remove_orphans(path: Path) -> None:
    """Remove the temporary and swapped-out folders of ``path`` left by a writer that was
    killed (``kill -9`` during an export): each name carries its writer's pid, and only those
    of processes no longer running are removed."""
    for sibling in path.parent.glob(f".{path.name}.*-*"):
        kind, _, rest = sibling.name[len(path.name) + 2 :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _running(int(pid)):
            if sibling.is_dir():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable bytes for equal content)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def image_grid(rows: list[np.ndarray], scale: int = 1, gap: int = 2) -> np.ndarray:
    """Lay out rows of ``(N, H, W, 3)`` uint8 images as one ``(rows*H', N*W', 3)`` picture.

    Each image is enlarged ``scale`` times (nearest neighbour, so pixels stay crisp) and
    separated by ``gap`` gray pixels.
    """
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    grid = np.full((len(rows) * (h + gap) + gap, n * (w + gap) + gap, 3), 128, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            big = image.repeat(scale, axis=0).repeat(scale, axis=1)
            top, left = gap + i * (h + gap), gap + j * (w + gap)
            grid[top : top + h, left : left + w] = big
    return grid


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 array as a PNG, atomically."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
