"""Named, owned background tasks: every long-lived coroutine of the agent starts here.

A task started with :func:`start_task` has a name (visible in ``asyncio.all_tasks()`` and in
logs) and logs an unexpected end (an exception, or returning while it was meant to run
forever). :func:`stop_tasks` cancels and waits with a bound, so shutdown cannot hang on a task
that ignores cancellation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

__all__ = ["start_task", "stop_tasks"]

T = TypeVar("T")


def start_task(coro: Coroutine[Any, Any, T], *, name: str, forever: bool = True) -> asyncio.Task[T]:
    """Start ``coro`` as task ``name``; log if it fails (or ends although ``forever``)."""
    task = asyncio.create_task(coro, name=name)

    def _done(done: asyncio.Task[T]) -> None:
        if done.cancelled():
            return
        exc = done.exception()
        if exc is not None:
            logger.error("task %s failed", name, exc_info=exc)
        elif forever:
            logger.debug("task %s ended", name)

    task.add_done_callback(_done)
    return task


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], grace: float) -> None:
    """Cancel the tasks still running and wait at most ``grace`` seconds for them to end."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        _, still = await asyncio.wait(pending, timeout=grace)
        for task in still:
            logger.warning("task %s did not stop within %.1fs", task.get_name(), grace)
