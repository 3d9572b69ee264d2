"""What the command line tells a user when a run stops or fails: one or two lines, the last good state
and the exact command that continues it (the error boundary of ``cli.main``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def resume_command(argv: list[str], state: Path) -> str:
    """The command line that continues ``argv``'s run from ``state``, ready to paste into a shell."""
    import shlex

    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    return shlex.join(["lora-workbench", *args, "--resume", str(state)])


def last_good(cb, ns: argparse.Namespace) -> str | None:
    """'the last good state is X (step N); continue with: ...' if this run saved one."""
    state = getattr(cb, "last_state", None)
    if state is None:
        return None
    folder, step = state
    return f"the last good state is {folder} (step {step}); continue with: {resume_command(ns.argv, folder)}"


def stopped_message(e, cb, ns: argparse.Namespace) -> str:
    """One line for a run stopped by SIGINT/SIGTERM: what was kept and how to go on."""
    state, lora = getattr(cb, "last_state", None), getattr(cb, "last_lora", None)
    if state is not None:
        folder, step = state
        kept = f"; LoRA so far in {lora[0]}" if lora is not None and lora[1] == step else ""
        return (f"stopped by {e.signame} at step {step}/{cb.total}: state saved in {folder}{kept}; "
                f"continue with: {resume_command(ns.argv, folder)}")
    if getattr(cb, "task", None) == "class images" and ns.class_dir:
        from ..training.train.class_images import existing_class_images

        n = len(existing_class_images(Path(ns.class_dir)))
        return (f"stopped by {e.signame} while generating class images: the {n} finished ones are kept in "
                f"{ns.class_dir}; run the same command again to make the rest and train")
    return f"stopped by {e.signame} before the first training step finished; nothing to resume"


def disk_full(e: BaseException) -> bool:
    import errno

    text = str(e)
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "code: 28" in text \
        or "file write failed" in text  # torch.save's wording for a failed write


def error_message(e: BaseException, ns: argparse.Namespace) -> str | None:
    """One line for an error a user can act on; None for a bug (shown with its traceback)."""
    import pickle
    import shutil

    from safetensors import SafetensorError

    if disk_full(e):
        where = Path(getattr(e, "filename", None) or getattr(ns, "out", None) or ".")
        folder = where if where.is_dir() else where.parent
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        return f"disk full: could not write to {folder} ({free}); free some space or choose another --out folder"
    if isinstance(e, pickle.UnpicklingError):
        return f"cannot read a pickle file: {str(e).splitlines()[0]}; use a .safetensors file"
    if isinstance(e, SafetensorError):
        return f"cannot read or write a .safetensors file ({e}); it may be damaged or incomplete"
    if isinstance(e, OSError) and not isinstance(e, (FileExistsError, FileNotFoundError)) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else str(e)
    if isinstance(e, (ValueError, RuntimeError, OSError)):
        return str(e)  # our errors say what is wrong and how to fix it
    return None
