"""The one base of every error LoRA Workbench raises on purpose.

Each subclass also derives from the built-in error it stands for (``ValueError`` for bad input,
``RuntimeError`` for a run that cannot go on, ...), so callers may catch either. Its message names the
problem, the offending value and the fix; the command line prints it as one line. A stop signal is not an
error: ``interrupt.Interrupted`` is a ``KeyboardInterrupt``.
"""


class LoraWorkbenchError(Exception):
    """An error with a message meant for the user: what is wrong, the value, and how to fix it."""
