"""Safe file writes: temp file in the same folder + atomic rename, never a silent overwrite."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable
from .errors import LoraWorkbenchError


class FileExistsNoOverwriteError(LoraWorkbenchError, FileExistsError):
    """Raised when a write would replace an existing file and overwrite was not asked for."""


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode ``open()``/``mkdir()`` would give a new file or folder: 0o666/0o777 less the umask.
    mkstemp/mkdtemp make 0600/0700, which a ComfyUI or A1111 running as another user cannot read."""
    return (0o777 if directory else 0o666) & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename.

    A crash mid-write leaves at most a ``.tmp`` file beside the target, never a truncated target.
    The file gets the mode of any new file (the umask's), not mkstemp's 0600.
    An existing ``path`` is replaced only when ``overwrite`` is true.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsNoOverwriteError(
            f"{path} already exists; choose another name or pass overwrite=True to replace it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # After the write: some writers (safetensors) replace the file with a 0600 one of their own.
        os.chmod(tmp, umask_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # os.link fails if the target appeared meanwhile: no race can overwrite a user's file.
            try:
                os.link(tmp, path)
            except FileExistsError as e:
                raise FileExistsNoOverwriteError(
                    f"{path} already exists; choose another name or pass overwrite=True to replace it"
                ) from e
            except OSError:
                # Filesystems without hard links: fall back to a checked rename.
                if path.exists():
                    raise FileExistsNoOverwriteError(f"{path} already exists") from None
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
