"""Ctrl-C that is never lost.

Python's own SIGINT handler raises ``KeyboardInterrupt`` at whatever bytecode runs next; when that
is a destructor or a weakref callback (garbage collection), Python prints "Exception ignored" and
drops it, and the command would carry on as if nothing happened. The handler installed here also
records the interrupt, and :func:`raise_if_interrupted`, called at every training step and before
every trial, raises it again.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_pending = threading.Event()


def _on_sigint(signum, frame):
    _pending.set()
    raise KeyboardInterrupt


@contextmanager
def interrupts_recorded():
    """Record SIGINT for :func:`raise_if_interrupted` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending.clear()
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending.clear()


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived and its exception may have been swallowed."""
    if _pending.is_set():
        raise KeyboardInterrupt
