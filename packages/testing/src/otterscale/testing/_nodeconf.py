"""What a test node is made of: its addresses and every configuration file its processes read.

Pure functions of a :class:`NodeLayout` (no process, no file system), so what the node runs with
can be read and tested on its own. ``_node`` writes these files and starts the processes.

Settings that matter on the machines this project runs on (see ``real-node.md`` in the design
notes for the measurements behind them):

- kubelet ``failCgroupV1: false``: 1.36 refuses cgroup v1 otherwise;
- containerd ``restrict_oom_score_adj``: runc cannot lower ``oom_score_adj`` without
  CAP_SYS_RESOURCE, which the bounding set here lacks, so every sandbox would fail;
- kube-proxy's conntrack settings at 0: it would otherwise write host-global conntrack sysctls;
- a ``cgroupRoot`` of the node's own, so its Pods' cgroups are one subtree that stop removes;
- no ``forward`` plugin in CoreDNS: no DNS query leaves the node.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path
from typing import Any

import yaml

#: Node ``i`` uses 10.250.i.0/24 between host and node, 10.244.i.0/24 for Pods and
#: 10.(96+i).0.0/16 for Services: distinct per node, so the host's routes never overlap.
MAX_NODES = 16
CLUSTER_DOMAIN = "cluster.local"
#: Ports inside the node's network namespace (nothing else listens there).
APISERVER_PORT = 6443
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
#: CoreDNS listens on an unprivileged port (it runs without capabilities); the Service maps 53.
COREDNS_PORT = 1053


@dataclasses.dataclass(frozen=True)
class NodeLayout:
    """Names and addresses of node ``index`` and the paths of its folder."""

    index: int
    directory: Path

    def __post_init__(self) -> None:
        if not 0 <= self.index < MAX_NODES:
            raise ValueError(f"node index {self.index} is not in 0..{MAX_NODES - 1}")

    # --- names --------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The Node object's name (and the kubelet's hostname override)."""
        return f"otterscale-node-{self.index}"

    @property
    def netns(self) -> str:
        return f"otsnode{self.index}"

    @property
    def host_veth(self) -> str:
        return f"otsh{self.index}"

    @property
    def node_veth(self) -> str:
        return f"otsn{self.index}"

    @property
    def cni_network(self) -> str:
        """The CNI network's name (libcni keeps results in /var/lib/cni/results/<name>-*)."""
        return self.name

    @property
    def cgroup_root(self) -> str:
        """The Pods' cgroup parent (``/sys/fs/cgroup/<controller>/<this>/kubepods/...``)."""
        return f"/{self.name}"

    # --- addresses ----------------------------------------------------------------------------

    @property
    def node_ip(self) -> str:
        """The node's address (in its namespace): API server, kubelet, NodePorts."""
        return f"10.250.{self.index}.1"

    @property
    def host_ip(self) -> str:
        """The host's end of the veth: what Pods reach host services at (Keycloak, other clusters)."""
        return f"10.250.{self.index}.254"

    @property
    def link_prefix(self) -> int:
        return 24

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def service_cidr(self) -> str:
        return f"10.{96 + self.index}.0.0/16"

    def service_ip(self, offset: int) -> str:
        return str(ipaddress.ip_network(self.service_cidr)[offset])

    @property
    def kubernetes_service_ip(self) -> str:
        return self.service_ip(1)

    @property
    def dns_ip(self) -> str:
        return self.service_ip(10)

    @property
    def server(self) -> str:
        """The API server, as the host (and everything in the node) reaches it."""
        return f"https://{self.node_ip}:{APISERVER_PORT}"

    # --- paths --------------------------------------------------------------------------------

    def path(self, *parts: str) -> Path:
        return self.directory.joinpath(*parts)

    @property
    def containerd_socket(self) -> Path:
        return self.path("containerd", "containerd.sock")

    @property
    def runc_root(self) -> Path:
        return self.path("containerd", "runc")

    @property
    def pod_logs(self) -> Path:
        return self.path("pod-logs")


def containerd_config(layout: NodeLayout, *, sandbox_image: str, runc: str) -> str:
    """containerd's own instance: own root, state, socket and CNI folder (never the system one)."""
    d = layout.path("containerd")
    config = {
        "version": 2,
        "root": str(d / "root"),
        "state": str(d / "state"),
        "disabled_plugins": [
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.aufs",
        ],
        "grpc": {"address": str(layout.containerd_socket)},
        "ttrpc": {"address": str(layout.containerd_socket) + ".ttrpc"},
        "debug": {"address": ""},
        "metrics": {"address": ""},
        "plugins": {
            "io.containerd.internal.v1.opt": {"path": str(d / "opt")},
            "io.containerd.grpc.v1.cri": {
                "sandbox_image": sandbox_image,
                # No CAP_SYS_RESOURCE here: runc must not try to lower oom_score_adj.
                "restrict_oom_score_adj": True,
                "enable_selinux": False,
                "stream_server_address": "127.0.0.1",
                "containerd": {
                    "snapshotter": "overlayfs",
                    "default_runtime_name": "runc",
                    "runtimes": {
                        "runc": {
                            "runtime_type": "io.containerd.runc.v2",
                            "options": {
                                "SystemdCgroup": False,
                                "Root": str(layout.runc_root),
                                "BinaryName": runc,
                            },
                        }
                    },
                },
                "cni": {"bin_dir": "/usr/lib/cni", "conf_dir": str(layout.path("cni", "net.d"))},
            },
        },
    }
    return _toml(config)


def _toml(value: dict[str, Any], prefix: str = "") -> str:
    """The little TOML containerd's configuration needs (tables, strings, bools, ints, lists)."""
    scalars, tables = [], []
    for key, item in value.items():
        quoted = key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)
        if isinstance(item, dict):
            tables.append(_toml(item, f"{prefix}{quoted}."))
        else:
            scalars.append(f"{quoted} = {_toml_value(item)}")
    text = ""
    if scalars:
        header = f"[{prefix[:-1]}]\n" if prefix else ""
        text = header + "\n".join(scalars) + "\n\n"
    return text + "".join(tables)


def _toml_value(item: Any) -> str:
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int):
        return str(item)
    if isinstance(item, str):
        return json.dumps(item)
    if isinstance(item, list):
        return "[" + ", ".join(_toml_value(i) for i in item) + "]"
    raise TypeError(f"no TOML for {item!r}")


def cni_config(layout: NodeLayout) -> str:
    """A bridge with host-local addresses and port mapping; no masquerade (nothing leaves the node)."""
    return json.dumps(
        {
            "cniVersion": "0.4.0",
            "name": layout.cni_network,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "hairpinMode": True,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": layout.pod_cidr}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(layout.path("cni", "ipam")),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        },
        indent=2,
    )


def kubelet_config(layout: NodeLayout, *, ca_file: Path) -> str:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # Kubernetes 1.36 refuses cgroup v1 unless told otherwise; these machines have v1.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": layout.cgroup_root,
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        "address": layout.node_ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "x509": {"clientCAFile": str(ca_file)},
            "webhook": {"enabled": False},
            "anonymous": {"enabled": False},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDNS": [layout.dns_ip],
        "clusterDomain": CLUSTER_DOMAIN,
        # No upstream resolver: Pods with dnsPolicy Default get none, so no query leaves the node.
        "resolvConf": "",
        "podLogsDir": str(layout.pod_logs),
        "failSwapOn": False,
        # A busy CI disk must not evict the test's Pods or collect its imported images.
        "evictionHard": {
            "memory.available": "1%",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "nodeStatusUpdateFrequency": "4s",
        "serializeImagePulls": False,
        "shutdownGracePeriod": "0s",
        "protectKernelDefaults": False,
        "staticPodPath": "",
        "containerLogMaxSize": "10Mi",
    }
    return yaml.safe_dump(config, sort_keys=False)


def kube_proxy_config(layout: NodeLayout, *, kubeconfig: Path) -> str:
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "clusterCIDR": layout.pod_cidr,
        "hostnameOverride": layout.name,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # 0: leave the host-global conntrack sysctls alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }
    return yaml.safe_dump(config, sort_keys=False)


def kubeconfig(layout: NodeLayout, *, user: str, ca_file: Path, cert: Path, key: Path) -> str:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": layout.name, "cluster": {"server": layout.server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": layout.name, "context": {"cluster": layout.name, "user": user}}],
        "current-context": layout.name,
    }
    return yaml.safe_dump(config, sort_keys=False)


COREDNS_NAMESPACE = "kube-system"


def coredns_objects(layout: NodeLayout, image: str) -> list[dict[str, Any]]:
    """Cluster DNS: ServiceAccount, RBAC, Corefile, Deployment and the ``kube-dns`` Service."""
    labels = {"k8s-app": "kube-dns"}
    meta = {"name": "coredns", "namespace": COREDNS_NAMESPACE}
    corefile = (
        f".:{COREDNS_PORT} {{\n"
        "    errors\n"
        "    health :8080\n"
        "    ready :8181\n"
        f"    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n"
        "        pods insecure\n"
        "        fallthrough in-addr.arpa ip6.arpa\n"
        "    }\n"
        "    cache 30\n"
        "    loadbalance\n"
        "}\n"
    )
    rbac_rules = [
        {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    ]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "otterscale-node:coredns"},
            "rules": rbac_rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "otterscale-node:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "otterscale-node:coredns",
            },
            "subjects": [{"kind": "ServiceAccount", **meta}],
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": dict(meta), "data": {"Corefile": corefile}},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {**meta, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 65532,
                            "runAsGroup": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [
                            {
                                "name": "coredns",
                                "image": image,
                                "imagePullPolicy": "Never",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"name": "dns", "containerPort": COREDNS_PORT, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": COREDNS_PORT, "protocol": "TCP"},
                                ],
                                "readinessProbe": {
                                    "httpGet": {"path": "/ready", "port": 8181},
                                    "periodSeconds": 1,
                                },
                                "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}},
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]},
                                },
                                "resources": {
                                    "requests": {"cpu": "10m", "memory": "32Mi"},
                                    "limits": {"memory": "128Mi"},
                                },
                                "volumeMounts": [
                                    {"name": "config", "mountPath": "/etc/coredns", "readOnly": True}
                                ],
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": COREDNS_NAMESPACE, "labels": labels},
            "spec": {
                "clusterIP": layout.dns_ip,
                "selector": labels,
                "ports": [
                    {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "targetPort": "dns-tcp", "protocol": "TCP"},
                ],
            },
        },
    ]
