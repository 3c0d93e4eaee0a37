"""The local terminal of ``otterscale exec -t``: raw mode, its size, and size changes.

Raw mode passes every key (Ctrl-C, arrows, tab) to the remote shell instead of acting on it
locally, as ``kubectl exec -it`` and ``ssh`` do; the previous mode is restored however the
command ends. SIGWINCH (the window changed size) calls back with the new size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import termios
import tty
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

__all__ = ["is_terminal", "on_resize", "raw_mode", "terminal_size"]


def is_terminal(fd: int) -> bool:
    return os.isatty(fd)


def terminal_size(fd: int) -> tuple[int, int] | None:
    """(rows, cols) of the terminal on ``fd``, or None when it is not one."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.lines, size.columns


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Put the terminal on ``fd`` into raw mode for the block (a no-op when it is not a terminal)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def on_resize(fd: int, callback: Callable[[int, int], None]) -> Iterator[None]:
    """Call ``callback(rows, cols)`` on the running loop whenever the window size changes."""
    if sys.platform == "win32" or not os.isatty(fd):
        yield
        return
    loop = asyncio.get_running_loop()

    def changed() -> None:
        size = terminal_size(fd)
        if size is not None:
            callback(*size)

    loop.add_signal_handler(signal.SIGWINCH, changed)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
