"""OtterScale benchmark suite (``nox -s bench``; ``python bench/run.py --help``).

Starts real components on loopback (a Kubernetes control plane, a local OIDC issuer, the hub and
its agents as OS processes connected by real chisel tunnels) and measures, side by side, the
three ways to reach a cluster:

- ``direct``: kube-apiserver itself over HTTPS (the physical limit);
- ``agent``: the agent's Connect API directly (identity headers signed by the benchmark);
- ``hub``: hub -> chisel tunnel -> agent -> kube-apiserver, with an OIDC bearer token.

``--only kubeclient`` compares HTTP clients the agent could use to call kube-apiserver (aiohttp,
which ships, and pyqwest), without hub or agent (``_kubeclient``).

Results go to ``results/bench-<timestamp>/`` (``results.json``, ``report.md``, PNG plots,
py-spy profiles). Not a test suite: only a functional failure (an error answer, a lost event, a
wrong item count) makes it exit non-zero; a missed performance target is reported, not failed.
"""

__all__: list[str] = []
