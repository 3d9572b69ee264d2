"""Safe file writes: temp file in the same folder + atomic rename, never a silent overwrite."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


class FileExistsNoOverwrite(FileExistsError):
    """Raised when a write would replace an existing file and overwrite was not asked for."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename.

    A crash mid-write leaves at most a ``.tmp`` file beside the target, never a truncated target.
    An existing ``path`` is replaced only when ``overwrite`` is true.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsNoOverwrite(
            f"{path} already exists; choose another name or pass overwrite=True to replace it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # os.link fails if the target appeared meanwhile: no race can overwrite a user's file.
            try:
                os.link(tmp, path)
            except FileExistsError as e:
                raise FileExistsNoOverwrite(
                    f"{path} already exists; choose another name or pass overwrite=True to replace it"
                ) from e
            except OSError:
                # Filesystems without hard links: fall back to a checked rename.
                if path.exists():
                    raise FileExistsNoOverwrite(f"{path} already exists") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def unique_path(path: str | os.PathLike) -> Path:
    """``name.ext`` if free, else ``name_00001.ext``, ``name_00002.ext`` ... (ComfyUI's habit)."""
    path = Path(path)
    if not path.exists():
        return path
    i = 1
    while True:
        cand = path.with_name(f"{path.stem}_{i:05d}{path.suffix}")
        if not cand.exists():
            return cand
        i += 1
