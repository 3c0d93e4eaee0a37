"""Named, owned background tasks: every long-lived coroutine of the hub starts here.

A task started with :func:`spawn` has a name (it shows in logs and ``asyncio.all_tasks()``) and
logs an unexpected end: an exception at ERROR with its traceback, a normal return at DEBUG.
Whoever spawns a task keeps it and stops it (see ``Hub.stop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Start ``coro`` as a task called ``name`` that logs how it ended."""
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_report)
    return task


def _report(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        logger.error("task %s failed", task.get_name(), exc_info=exc)
    else:
        logger.debug("task %s finished", task.get_name())


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, within: float = 5.0) -> None:
    """Cancel ``tasks`` and wait (at most ``within`` seconds) for them to end."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        done, still = await asyncio.wait(pending, timeout=within)
        for task in done:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        for task in still:
            logger.warning("task %s did not stop within %gs", task.get_name(), within)
