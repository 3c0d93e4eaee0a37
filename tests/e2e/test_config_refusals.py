"""``otterscale server`` and ``otterscale agent`` refuse a broken otterscale.yaml (issue 13, part 5).

Each service is started as a process from its installed console script, exactly as an operator
runs it, with a file that has one mistake: a bad ``limits`` value, two clusters on one
``tunnel_port``, a weak secret, a misspelled key. Each must exit with status 1 at once, name the
file and the dotted key path of the mistake, and print no secret of the file (the tunnel key seed
and the agents' passwords are long random values here, so a leak would be visible).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from otterscale.testing import free_port, tool_path

pytestmark = [pytest.mark.integration, pytest.mark.security]

SEED = secrets.token_urlsafe(32)
PASSWORDS = {"alpha": secrets.token_urlsafe(32), "beta": secrets.token_urlsafe(32)}


def otterscale() -> str:
    beside = Path(sys.executable).with_name("otterscale")
    assert beside.exists(), "the otterscale command is not installed next to this interpreter"
    return str(beside)


def good_config() -> dict[str, Any]:
    return {
        "keycloak": {"realm_url": "http://127.0.0.1:1/realms/none", "client_id": "otterscale"},
        "tunnel": {"server": {"host": "127.0.0.1", "port": free_port(), "key_seed": SEED}},
        "clusters": {
            name: {
                "agent": {
                    "auth": {"user": f"{name}-agent", "pass": password},
                    "fingerprint": "k3tNNCbWyIqIG8qkN0J1v2dUcnS1xCYUqMqBo36fUKE=",
                    "tunnel_port": free_port(),
                    "api_port": free_port(),
                }
            }
            for name, password in PASSWORDS.items()
        },
    }


def bad_limits(config: dict[str, Any]) -> None:
    config["limits"] = {"max_request_bytes": 10}


def shared_tunnel_port(config: dict[str, Any]) -> None:
    clusters = config["clusters"]
    clusters["beta"]["agent"]["tunnel_port"] = clusters["alpha"]["agent"]["tunnel_port"]


def weak_seed(config: dict[str, Any]) -> None:
    config["tunnel"]["server"]["key_seed"] = "correct-horse"


def weak_password(config: dict[str, Any]) -> None:
    config["clusters"]["alpha"]["agent"]["auth"]["pass"] = "a-long-random-password"  # the README's example


def unknown_key(config: dict[str, Any]) -> None:
    config["keycloak"]["leeway_second"] = 5


BROKEN = {
    "bad-limits": (bad_limits, "limits.max_request_bytes: must be greater than or equal to 1024"),
    "shared-tunnel-port": (shared_tunnel_port, "clusters.beta.agent.tunnel_port: port"),
    "weak-seed": (weak_seed, "tunnel.server.key_seed: is shorter than 32 characters"),
    "weak-password": (weak_password, "clusters.alpha.agent.auth.pass: is an example value"),
    "unknown-key": (unknown_key, "keycloak.leeway_second: unknown key (did you mean leeway_seconds?)"),
}


def command(service: str, config: Path) -> list[str]:
    common = [f"--config={config}", f"--address=127.0.0.1:{free_port()}", f"--chisel={tool_path('chisel')}"]
    if service == "server":
        return [otterscale(), "server", *common]
    kubeconfig = config.with_name("unused.kubeconfig")
    return [otterscale(), "agent", "--cluster=alpha", *common, f"--kubeconfig={kubeconfig}"]


@pytest.mark.parametrize("service", ["server", "agent"])
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_configuration_stops_the_service_with_the_key_and_no_secret(
    tmp_path: Path, service: str, case: str
) -> None:
    document = good_config()
    breaks, expected = BROKEN[case]
    breaks(document)
    path = tmp_path / "otterscale.yaml"
    path.write_text(yaml.safe_dump(document))
    done = subprocess.run(
        command(service, path), capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert done.stderr.startswith(f"otterscale {service}: {path}: "), done.stderr
    assert f"{path}: {expected}" in done.stderr, done.stderr
    assert "Traceback" not in output
    for secret in (SEED, *PASSWORDS.values(), "correct-horse", "a-long-random-password"):
        assert secret not in output


@pytest.mark.parametrize("service", ["server", "agent"])
def test_every_mistake_of_a_file_is_reported_at_once(tmp_path: Path, service: str) -> None:
    document = good_config()
    for breaks, _ in BROKEN.values():
        breaks(document)
    path = tmp_path / "otterscale.yaml"
    path.write_text(yaml.safe_dump(document))
    done = subprocess.run(
        command(service, path), capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
    )
    assert done.returncode == 1, done.stderr
    for _, expected in BROKEN.values():
        assert f"{path}: {expected}" in done.stderr, done.stderr
