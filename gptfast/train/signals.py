"""Ctrl-C and SIGTERM: a stop request the loop honours after the current step."""

from __future__ import annotations

import contextlib
import signal
import threading


class StopRequest:
    """SIGINT/SIGTERM ask the run to stop after the current step; a second Ctrl-C stops at once,
    unless ``second_interrupt_quits`` is off (under torchrun every rank gets Ctrl-C twice, from
    the terminal and from the agent, which itself kills workers that do not exit in time)."""

    def __init__(self, second_interrupt_quits: bool = True):
        self.requested = False
        self.second_interrupt_quits = second_interrupt_quits
        self._previous = {}
        self._raise = None

    @contextlib.contextmanager
    def raising(self, error: type):
        """Within it, a stop request also raises `error` at once, from wherever the main thread
        is (between two torch ops, or in the loader's wait): for work that may stop midway
        without losing anything, like an evaluation."""
        self._raise = error
        try:
            yield
        finally:
            self._raise = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT and self.second_interrupt_quits:
            raise KeyboardInterrupt
        self.requested = True
        if self._raise is not None:
            error, self._raise = self._raise, None
            raise error

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

