"""otterscale-cli: ``otterscale logs | exec | port-forward | scale | restart`` through the hub.

The commands register in the ``otterscale`` command of otterscale-common (entry points of the
group ``otterscale.commands``) and call RuntimeService on the hub with the user's OIDC token,
exactly as a dashboard does; nothing here talks to Kubernetes or an agent directly.

Only the names in ``__all__`` are public; the underscore modules may change at any time.
"""

from ._options import ClientOptions, client_options
from ._workloads import Workload, parse_workload

__all__ = ["ClientOptions", "Workload", "client_options", "parse_workload"]
