"""SIGINT and SIGTERM as one path: both raise :class:`Interrupted` (a KeyboardInterrupt).

``docker stop``, systemd, Slurm and ``timeout`` send SIGTERM, whose default kills the process at
once; Ctrl-C sends SIGINT. Inside :func:`raise_on_signals` both become an exception, so the code
that already keeps a resumable state on Ctrl-C (or on a host's Cancel) also runs on SIGTERM.
:func:`signals_held` delays them over a few lines that must not be cut in half (an optimizer
update and the step counter that goes with it).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; ``exit_code`` is the shell's 128 + signal number (130, 143)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(self.signame)

    @property
    def exit_code(self) -> int:
        """The shell's exit status for this signal: 128 + signal number."""
        return 128 + self.signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise(signum, frame):
    raise Interrupted(signum)


@contextmanager
def raise_on_signals() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise :class:`Interrupted`. The previous handlers come back on exit.
    Outside the main thread (where Python cannot set handlers) this does nothing."""
    if not _main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def signals_held() -> Iterator[None]:
    """Within: a SIGINT/SIGTERM with a Python handler is recorded, and handled on leaving the block.

    Signals with the default or ignore disposition are left alone (a SIGTERM still kills at once
    where nobody asked otherwise), and nothing changes outside the main thread.
    """
    if not _main_thread():
        yield
        return
    held = [s for s in SIGNALS if callable(signal.getsignal(s))]
    arrived: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if arrived:
        previous[arrived[0]](arrived[0], None)
