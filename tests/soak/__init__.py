"""Soak test: mixed ResourceService traffic through two hub replicas while components are killed.

Run it with ``nox -s soak`` (``-- --duration SECONDS``, ``-- --help`` for the options); the code
is in :mod:`soak._run` (orchestration and the final checks), :mod:`soak._traffic` (clients, the
expected-state model, watchers), :mod:`soak._faults` (the fault injector) and
:mod:`soak._procs` (RSS and file descriptors from /proc). Not collected by pytest (no test_
modules): it is a program with its own exit status, like ``bench/``.
"""
