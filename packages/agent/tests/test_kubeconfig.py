"""Where the agent's own credentials come from: flag, KUBECONFIG, ~/.kube/config, in-cluster."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from otterscale.agent import KubeConfigError, load_connection


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path_factory.mktemp("ca") / "ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def write_kubeconfig(path: Path, server: str, ca: Path, token: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority": str(ca)}}],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "ctx",
            }
        )
    )
    return path


async def test_flag_wins(tmp_path: Path, ca_file: Path) -> None:
    flag = write_kubeconfig(tmp_path / "flag.yaml", "https://flag.example:6443", ca_file, "t-flag")
    env = write_kubeconfig(tmp_path / "env.yaml", "https://env.example:6443", ca_file, "t-env")
    conn = await load_connection(str(flag), {"KUBECONFIG": str(env)}, home=tmp_path)
    assert conn.server == "https://flag.example:6443"
    assert await conn.authorization() == "Bearer t-flag"
    assert "--kubeconfig" in conn.source
    assert conn.ssl_context is not None


async def test_kubeconfig_env_list(tmp_path: Path, ca_file: Path) -> None:
    env = write_kubeconfig(tmp_path / "env.yaml", "https://env.example:6443", ca_file, "t-env")
    conn = await load_connection(None, {"KUBECONFIG": f"{tmp_path / 'missing.yaml'}:{env}"}, home=tmp_path)
    assert conn.server == "https://env.example:6443"
    assert "KUBECONFIG" in conn.source


async def test_home_kube_config(tmp_path: Path, ca_file: Path) -> None:
    write_kubeconfig(tmp_path / ".kube" / "config", "https://home.example:6443/", ca_file, "t-home")
    conn = await load_connection(None, {}, home=tmp_path)
    assert conn.server == "https://home.example:6443"
    assert await conn.authorization() == "Bearer t-home"


async def test_in_cluster(tmp_path: Path, ca_file: Path) -> None:
    token = tmp_path / "token"
    token.write_text("sa-token")
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    conn = await load_connection(
        None, environ, home=tmp_path, in_cluster_token=str(token), in_cluster_ca=str(ca_file)
    )
    assert conn.server == "https://10.96.0.1:443"
    assert conn.source == "in-cluster service account"
    assert await conn.authorization() == "bearer sa-token"


async def test_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="no Kubernetes credentials"):
        await load_connection(None, {}, home=tmp_path, in_cluster_token=str(tmp_path / "none"))


async def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="not found"):
        await load_connection(str(tmp_path / "nope.yaml"), {}, home=tmp_path)
