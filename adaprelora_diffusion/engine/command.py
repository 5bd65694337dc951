"""One mapping from errors to exit statuses and one-line messages, for every command here.

``adaprelora-dreambooth``, ``adaprelora-llm`` and the app's commands (``adaprelora-app`` and its
job worker) end a failed run the same way: one line ``error: <what happened and the fix>`` on
stderr (the traceback only with ``--debug``) and an exit status that says what kind of failure it
was. A message is written once, where the error is raised; nothing here rewraps it.

=====  =================================================================================
 0     done
 1     the run failed: `TrainingError` (and its kinds: a damaged checkpoint, a diverged
       loss), a full disk (OSError), a library failure
 2     bad flags or data (ValueError, argparse's own errors): refused before training
 130   Ctrl-C (the first stops cleanly with a checkpoint; a second aborts)
 143   SIGTERM (preemption, ``kill``, ``docker stop``): stopped cleanly with a checkpoint
=====  =================================================================================
"""

from __future__ import annotations

import sys
import traceback
from typing import TextIO

from .errors import TrainingError

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_SIGINT", "EXIT_SIGTERM", "DEBUG_FLAG", "exit_status",
           "error_text", "error_line", "report_error", "pop_debug_flag"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143

#: the flag every command takes to print the traceback of an error
DEBUG_FLAG = "--debug"

#: errors whose message is ours (or a library's that already reads as one line for people)
_EXPECTED = (TrainingError, ValueError, OSError, RuntimeError, ImportError)

ABORTED = ("aborted: the second Ctrl-C stopped the run mid-step; the newest checkpoint is intact "
           "(continue with --resume_from_checkpoint latest).")


def exit_status(err: BaseException) -> int:
    """The exit status of a command that ends with ``err``."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(err, ValueError):
        return EXIT_USAGE
    return EXIT_FAILED


def error_text(err: BaseException) -> str:
    """The sentence for ``err`` (what a job's state records; the command prints it after ``error: ``)."""
    text = str(err).strip()
    if isinstance(err, _EXPECTED) and text:
        return text
    return f"{type(err).__name__}{': ' + text if text else ''} (rerun with {DEBUG_FLAG} for the traceback, and please report it)"


def error_line(err: BaseException) -> str:
    """What the command prints for ``err``: ``error: ...``, or ``aborted: ...`` for a second Ctrl-C."""
    return ABORTED if isinstance(err, KeyboardInterrupt) else f"error: {error_text(err)}"


def report_error(err: BaseException, debug: bool = False, stream: TextIO | None = None) -> int:
    """Print ``err`` as one line (after its traceback with ``debug``) and return the exit status."""
    stream = stream if stream is not None else sys.stderr
    if debug and not isinstance(err, KeyboardInterrupt):
        traceback.print_exception(err, file=stream)
    print(error_line(err), file=stream)
    return exit_status(err)


def pop_debug_flag(argv: list[str], values: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """``argv`` without a bare ``--debug`` (and the older ``--traceback``), and whether it was there.

    For a command whose parser already has a ``--debug`` that takes values (transformers'
    ``--debug underflow_overflow``): ``--debug`` followed by one of ``values`` stays for that parser.
    """
    rest, debug = [], False
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--traceback" or (arg == DEBUG_FLAG and following not in values):
            debug = True
            continue
        rest.append(arg)
    return rest, debug
