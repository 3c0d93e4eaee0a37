"""Defaults that ``otterscale agent`` shows in its help and the agent uses, importing nothing.

The command (:mod:`._cli`) is a launcher: it reads its flags and starts Envoy, where the agent
runs and imports its own modules. A default the launcher needs lives here rather than in the
module that uses it (:mod:`._discovery` loads the Kubernetes client), so that the launcher never
loads the agent only to print ``--help`` or to start Envoy.
"""

from __future__ import annotations

__all__ = ["DISCOVERY_TTL"]

#: Seconds Discovery and the OpenAPI index are cached (``--discovery-ttl``; see ``_discovery``).
DISCOVERY_TTL = 10.0
