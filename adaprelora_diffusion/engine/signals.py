"""Stop a run cleanly on the first Ctrl-C or SIGTERM; abort on a second Ctrl-C.

Cloud preemption, ``kill``, ``docker stop`` and job schedulers send SIGTERM; people press Ctrl-C.
The first of either only sets a flag that the training loop reads after each optimizer step
(``should_stop``): the step finishes, a checkpoint and the weights are written, and the command
exits with 143 (SIGTERM) or 130 (Ctrl-C). A second Ctrl-C raises KeyboardInterrupt at once.
Every command here uses this one handler.
"""

from __future__ import annotations

import signal
import sys
import threading

from .command import EXIT_SIGINT, EXIT_SIGTERM

__all__ = ["StopSignals"]


class StopSignals:
    """``with StopSignals() as stop:`` installs the handlers; ``stop()`` says whether a stop was asked for."""

    def __init__(self, stream=None):
        self.received: list[int] = []
        self._previous: dict[int, object] = {}
        self._stream = stream

    def _on_signal(self, signum, frame) -> None:
        self.received.append(signum)
        if len(self.received) > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if len(self.received) > 1:
            return  # a repeated SIGTERM (torchrun forwards it to every rank): already stopping
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)...",
              file=self._stream or sys.stderr, flush=True)

    def __call__(self) -> bool:
        return bool(self.received)

    @property
    def exit_status(self) -> int:
        """130 after Ctrl-C, 143 after SIGTERM (as shells report a process ended by that signal)."""
        return EXIT_SIGTERM if self.received and self.received[0] == signal.SIGTERM else EXIT_SIGINT

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
