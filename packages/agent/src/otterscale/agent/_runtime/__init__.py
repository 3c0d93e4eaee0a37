"""RuntimeService on the agent: pod logs, exec, port-forward, scale and restart (private package).

Modules by concept: ``_service`` (the RPC handlers), ``_sessions`` (ids, ownership, limits,
timeouts), ``_input`` (ordered, bounded writes), ``_pump`` (reader tasks to handlers),
``_connection`` and ``_channel`` (Kubernetes' WebSocket protocols), ``_pods`` (pod, container
and permission checks), ``_logs``, ``_workloads`` (scale and restart), ``_audit``.
"""

from ._service import RuntimeServiceImpl
from ._sessions import SessionKind, new_session_id, session_ref

__all__ = ["RuntimeServiceImpl", "SessionKind", "new_session_id", "session_ref"]
