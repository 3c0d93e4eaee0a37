"""What the test node runs with, read without starting it (no root needed): the settings its
design notes say matter, the addresses of several nodes never overlap, image archives are
deterministic, and the base image's cache key follows what goes into it."""

from __future__ import annotations

import ipaddress
import json
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

from otterscale.testing import _archive, _nodeconf, images
from otterscale.testing._nodeconf import NodeLayout


def test_nodes_never_share_an_address_range(tmp_path: Path) -> None:
    layouts = [NodeLayout(i, tmp_path / str(i)) for i in range(_nodeconf.MAX_NODES)]
    ranges = [
        ipaddress.ip_network(cidr, strict=False)
        for layout in layouts
        for cidr in (f"{layout.node_ip}/{layout.link_prefix}", layout.pod_cidr, layout.service_cidr)
    ]
    for i, a in enumerate(ranges):
        for b in ranges[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    names = [(lay.netns, lay.host_veth, lay.node_veth, lay.cgroup_root) for lay in layouts]
    assert len({n for group in names for n in group}) == 4 * len(layouts)
    assert all(len(lay.host_veth) <= 15 for lay in layouts)  # IFNAMSIZ
    with pytest.raises(ValueError, match=r"not in 0\.\.15"):
        NodeLayout(_nodeconf.MAX_NODES, tmp_path)


def test_the_service_addresses_follow_the_range(tmp_path: Path) -> None:
    layout = NodeLayout(3, tmp_path)
    assert layout.kubernetes_service_ip == "10.99.0.1"
    assert layout.dns_ip == "10.99.0.10"
    assert layout.server == "https://10.250.3.1:6443"
    assert layout.host_ip == "10.250.3.254"


def test_containerd_is_an_instance_of_its_own_that_never_lowers_oom_scores(tmp_path: Path) -> None:
    layout = NodeLayout(0, tmp_path)
    config = tomllib.loads(
        _nodeconf.containerd_config(layout, sandbox_image="localhost/p:1", runc="/usr/sbin/runc")
    )
    assert config["version"] == 2
    for key in ("root", "state"):
        assert Path(config[key]).is_relative_to(tmp_path)
    assert config["grpc"]["address"] == str(layout.containerd_socket)
    assert config["debug"]["address"] == ""  # not the system's /run/containerd/debug.sock
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True  # no CAP_SYS_RESOURCE here
    assert cri["sandbox_image"] == "localhost/p:1"
    runc = cri["containerd"]["runtimes"]["runc"]["options"]
    assert runc == {"SystemdCgroup": False, "Root": str(layout.runc_root), "BinaryName": "/usr/sbin/runc"}
    assert Path(cri["cni"]["conf_dir"]).is_relative_to(tmp_path)


def test_the_kubelet_and_kube_proxy_settings_that_matter_here(tmp_path: Path) -> None:
    layout = NodeLayout(1, tmp_path)
    kubelet = yaml.safe_load(_nodeconf.kubelet_config(layout, ca_file=tmp_path / "ca.crt"))
    assert kubelet["failCgroupV1"] is False
    assert kubelet["cgroupRoot"] == "/otterscale-node-1"
    assert kubelet["resolvConf"] == ""  # no upstream resolver: no query leaves the node
    assert kubelet["clusterDNS"] == ["10.97.0.10"]
    assert kubelet["imageGCHighThresholdPercent"] == 100  # imported images are never collected
    proxy = yaml.safe_load(_nodeconf.kube_proxy_config(layout, kubeconfig=tmp_path / "k"))
    assert proxy["mode"] == "iptables"
    assert proxy["conntrack"] == {
        "maxPerCore": 0,
        "min": 0,
        "tcpEstablishedTimeout": "0s",
        "tcpCloseWaitTimeout": "0s",
    }
    cni = json.loads(_nodeconf.cni_config(layout))
    bridge = cni["plugins"][0]
    assert bridge["ipMasq"] is False
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.244.1.0/24"}]]


def test_coredns_has_no_forward_plugin_and_runs_without_privileges(tmp_path: Path) -> None:
    objects = _nodeconf.coredns_objects(NodeLayout(0, tmp_path), "localhost/coredns:x")
    corefile = next(o for o in objects if o["kind"] == "ConfigMap")["data"]["Corefile"]
    assert "forward" not in corefile
    service = next(o for o in objects if o["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "10.96.0.10"
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_binary_images_are_deterministic_docker_archives(tmp_path: Path) -> None:
    binary = tmp_path / "tool"
    binary.write_bytes(b"\x7fELF not really")
    first = _archive.write_binary_image(tmp_path / "a.tar", "localhost/x/tool:1", binary, target="/tool")
    second = _archive.write_binary_image(tmp_path / "b.tar", "localhost/x/tool:1", binary, target="/tool")
    assert first == second
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        (manifest,) = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        config = json.loads(tar.extractfile(manifest["Config"]).read())  # type: ignore[union-attr]
    assert manifest["RepoTags"] == ["localhost/x/tool:1"]
    assert config["config"]["Entrypoint"] == ["/tool"]
    assert config["config"]["User"] == "65532:65532"


def test_the_base_image_key_follows_its_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    key = images.base_key()
    assert images.base_ref().endswith(key)
    monkeypatch.setattr(images, "BASE_PACKAGES", (*images.BASE_PACKAGES, "curl"))
    assert images.base_key() != key
    monkeypatch.setattr(images, "BASE_PACKAGES", images.BASE_PACKAGES[:-1])
    assert images.base_key() == key
    assert {"python3", "python3-venv", "libpython3.11", "tini"} <= set(images.BASE_PACKAGES)
