"""The host inside Envoy (``otterscale.common.host``): start-up with the cyclic collector paused.

The service is started in a fresh interpreter with the settings the launcher hands over (the
status pipe read here), its lifespan driven as pyvoy drives it; the service itself does nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from otterscale.common import ListenerLimits
from otterscale.common._launch import SETTINGS_ENV

SERVICE = """
import asyncio, gc, json, sys
from otterscale.common import Hosted, host
paused_while_loading = not gc.isenabled()  # where the service's own modules would load

class Idle:
    async def start(self): pass
    def drain(self): pass
    async def stop(self): pass
    async def failed(self):
        await asyncio.Event().wait()
        return ""

async def factory(settings):
    async def api(scope, receive, send): pass
    return Hosted(service=Idle(), api=api, limits=settings.limits)

app = host(factory)
after_start = {}

async def main():
    started = asyncio.Event()
    async def receive():
        if not started.is_set():
            return {"type": "lifespan.startup"}
        return {"type": "lifespan.shutdown"}
    async def send(message):
        if message["type"] == "lifespan.startup.complete":
            after_start.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count())
            started.set()
    await app({"type": "lifespan"}, receive, send)

asyncio.run(main())
print(json.dumps({"paused_while_loading": paused_while_loading, **after_start}))
"""


def test_start_up_runs_without_the_cyclic_collector_and_leaves_it_running(tmp_path: Path) -> None:
    control_read, control_write = os.pipe()
    status_read, status_write = os.pipe()
    settings = {
        "name": "test",
        "service": {},
        "control_fd": control_read,
        "status_fd": status_write,
        "admin_socket": str(tmp_path / "admin.sock"),
        "routes_file": str(tmp_path / "routes.json"),
        "api": ["127.0.0.1", 1],
        "management": None,
        "limits": ListenerLimits().as_dict(),
        "drain_timeout": 1.0,
        "stop_timeout": 2.0,
        "log_level": "info",
        "log_format": "text",
    }
    try:
        result = subprocess.run(
            [sys.executable, "-c", SERVICE],
            env={**os.environ, SETTINGS_ENV: json.dumps(settings)},
            pass_fds=(control_read, status_write),
            capture_output=True,
            text=True,
            timeout=120,  # an interpreter starting on a loaded 2-core machine
            check=False,
        )
        os.close(status_write)
        status = os.read(status_read, 65536).decode()
    finally:
        for fd in (control_read, control_write, status_read):
            os.close(fd)
    assert result.returncode == 0, result.stderr
    assert '"event": "started"' in status
    state = json.loads(result.stdout)
    # Paused while the service loads and starts; running again once it serves, with what
    # start-up made kept out of its passes.
    assert state == {"paused_while_loading": True, "enabled": True, "frozen": state["frozen"]}
    assert state["frozen"] > 1000
