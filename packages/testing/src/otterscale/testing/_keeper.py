"""The keeper of a test node: removes the node when the process that started it dies without
stopping it (SIGKILL, a crash, an orphaned test run).

``_node`` starts it in a session of its own (a Ctrl-C or a kill of the tests' process group does
not reach it) with the node's folder and the starter's pid. It waits on a pidfd of the starter;
when the starter exits it cleans up from ``<node dir>/footprint.json`` (``_footprint``), reports
what it could not undo in ``<node dir>/log/keeper.log``, and frees the node's index. A starter
that stops its node dismisses the keeper with SIGTERM. It inherits the index lock, so the index is
not handed out again before the cleanup is done.

Run as ``python -m otterscale.testing._keeper keep DIRECTORY PID`` (never imported by the package,
so ``-m`` runs it fresh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from . import _footprint
from ._footprint import LOCK_DIR, Footprint


def start_keeper(directory: Path, log: Path, lock_fd: int) -> subprocess.Popen[bytes]:
    """Start the keeper of the node in ``directory`` for this process (see the module docstring)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", _footprint.KEEPER_MODULE, "keep", str(directory), str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(lock_fd,),
        )


def keep(directory: Path, parent: int) -> int:
    """Wait for ``parent`` to exit, then clean up the node in ``directory`` (unless dismissed)."""

    def dismiss(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, dismiss)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pidfd: int | None = os.pidfd_open(parent)
    except ProcessLookupError:  # it died before we started waiting
        pidfd = None
    if pidfd is not None:
        with contextlib.suppress(InterruptedError):
            select.select([pidfd], [], [])
    print(f"parent {parent} exited: cleaning up the node in {directory}", flush=True)
    footprint = Footprint.load(directory)
    sandboxes = _footprint.sandbox_ids(footprint)
    pods = _footprint.pod_netns(footprint, sandboxes)
    errors = _footprint.clean(footprint)
    errors += [f"left behind: {mark}" for mark in _footprint.remaining(footprint, sandboxes, pods)]
    shutil.rmtree(directory / "containerd", ignore_errors=True)
    for pointer in LOCK_DIR.glob("*.json"):  # the index is free again (its lock goes with us)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(pointer.read_text()).get("directory") == str(directory):
                pointer.unlink()
    for error in errors:
        print(f"  not undone: {error}", flush=True)
    print("done", flush=True)
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {_footprint.KEEPER_MODULE}")
    sub = parser.add_subparsers(dest="command", required=True)
    keeper = sub.add_parser("keep", help="clean up the node in DIRECTORY when process PID exits")
    keeper.add_argument("directory", type=Path)
    keeper.add_argument("parent", type=int)
    args = parser.parse_args(argv)
    return keep(args.directory, args.parent)


if __name__ == "__main__":
    sys.exit(main())
