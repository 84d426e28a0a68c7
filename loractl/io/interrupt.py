"""A Ctrl-C that cannot be lost: the CLI's SIGINT handler also sets `REQUESTED`, which stays set.

Python raises KeyboardInterrupt wherever the main thread happens to be. Code that swallows it
(a `__del__` or a callback run from C prints "Exception ignored" and goes on; so does a library's
`except BaseException`) let a merge run to its end and exit 0; raised in the middle of `import torch`
it leaves numpy or torch half-initialised (an ImportError traceback, or a C++ abort). So:

- the event survives a swallowed KeyboardInterrupt: long loops call `check()` (a merge, per tensor),
  and `atomic_output` never renames an output into place once it is set;
- a Ctrl-C that arrives during an import is held until the import is done, then raised;
- once the command's output is in place (`completing`, around the final rename) the command has
  succeeded: a later Ctrl-C is noted (`LATE`) and interrupts nothing, and the CLI's process then
  exits 0 (`sigint_recorded(ignore_when_done=True)` ignores SIGINT for the rest of the process).

Library callers that install no handler are unaffected (the event is never set).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

REQUESTED = threading.Event()
LATE = threading.Event()  # a Ctrl-C arrived after the command's output was in place
_DONE = threading.Event()  # the command's output is (being) put in place: Ctrl-C interrupts nothing now
_ACTIVE = threading.Event()  # the CLI's handler is installed (library callers are unaffected)
_HOLDING = threading.Event()  # a thread waits to deliver a Ctrl-C that arrived during an import


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even when its first KeyboardInterrupt was swallowed."""
    if REQUESTED.is_set():
        raise KeyboardInterrupt


@contextmanager
def completing() -> Iterator[None]:
    """Around the final rename of the command's output: from its start a Ctrl-C interrupts nothing.

    On success the mark stays for the rest of the command (it has succeeded); if the rename
    fails, Ctrl-C interrupts again.
    """
    if not _ACTIVE.is_set():
        yield
        return
    _DONE.set()
    try:
        yield
    except BaseException:
        _DONE.clear()
        raise


def _handler(signum: int, frame: FrameType | None) -> None:
    if _DONE.is_set():
        LATE.set()
        return
    REQUESTED.set()
    if not _importing(frame):
        raise KeyboardInterrupt
    if not _HOLDING.is_set():
        _HOLDING.set()
        threading.Thread(target=_interrupt_after_import, name="loractl-sigint", daemon=True).start()


def _importing(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside an import (importlib's frames are on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _interrupt_after_import() -> None:
    """Wait until the main thread has left the import it was in, then deliver the held Ctrl-C there."""
    main = threading.main_thread()
    try:
        while main.is_alive() and _importing(sys._current_frames().get(main.ident or 0)):
            time.sleep(0.01)
    finally:
        _HOLDING.clear()
    if main.is_alive() and main.ident is not None:  # a real signal: it also ends a sleep or a blocking wait
        signal.pthread_kill(main.ident, signal.SIGINT)  # `_handler` runs again there, and raises (or holds again)


@contextmanager
def sigint_recorded(*, ignore_when_done: bool = False) -> Iterator[None]:
    """Inside the block, Ctrl-C sets `REQUESTED` and raises KeyboardInterrupt; the handler is restored after.

    Only where Python's own handler is installed, in the main thread: an ignored SIGINT (a background
    job) stays ignored. `ignore_when_done` (a process that ends with the command): once the output is
    in place, SIGINT stays ignored after the block, so the process cannot end killed by it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    REQUESTED.clear()
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, _handler)
        _ACTIVE.set()
    try:
        yield
    finally:
        if previous is signal.default_int_handler:
            done = _DONE.is_set() and ignore_when_done
            signal.signal(signal.SIGINT, signal.SIG_IGN if done else previous)
        for event in (REQUESTED, _DONE, _ACTIVE, LATE):
            event.clear()  # the command is over: later library calls in this process are not interrupted
