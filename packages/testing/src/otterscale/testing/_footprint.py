"""What a test node leaves outside its folder, recorded before it starts and removed when it stops.

A node is more than its processes: containerd's shims outlive containerd (they detach), container
processes live in the node's cgroups, the kubelet mounts Pod volumes, containerd mounts Pod
network namespaces under ``/run/netns``, libcni and the kubelet write a few hard-coded host
paths, and the kubelet changes host-global kernel settings. :class:`Footprint` is that list, kept
in ``<node dir>/footprint.json`` from before the first change, so :func:`clean` can undo all of it
from the file alone: when the node stops, and from the keeper process when the process that
started the node died without stopping it (see ``_node``).

Everything here is idempotent and best effort: each step runs even when an earlier one failed,
and the errors are returned, not raised, so one stuck mount cannot leave the rest behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

logger = logging.getLogger(__name__)

#: Host-global kernel settings the kubelet changes (``setupKernelTunables``), restored at stop.
KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
#: Host paths the kubelet or libcni create although the node's folder is elsewhere.
HARD_CODED_PATHS = (
    "/var/lib/kubelet",
    "/var/lib/kubelet/device-plugins",
    "/var/lib/kubelet/device-plugins/kubelet.sock",
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/cni",
    "/var/lib/cni/results",
)
NETNS_DIR = Path("/run/netns")
#: Node index locks (``<i>.lock``) and pointers to the folder of the node holding each (``<i>.json``).
LOCK_DIR = Path("/run/otterscale-node")
CGROUP_ROOT = Path("/sys/fs/cgroup")
_MNT_DETACH = 2
#: The keeper's module (``python -m ...``): it names the node's folder but is not part of the node.
KEEPER_MODULE = "otterscale.testing._keeper"
#: Seconds to wait for a recorded process to exit after SIGTERM before SIGKILL.
TERM_GRACE = 10.0


@dataclasses.dataclass
class Footprint:
    """The node's marks on the host (see the module docstring)."""

    directory: str
    netns: str
    host_veth: str
    cgroup_root: str
    cni_network: str
    containerd_socket: str
    #: Kernel settings (``/proc/sys`` relative paths) as they were before the node started.
    sysctls: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Network namespaces that existed before (everything else in /run/netns is the node's).
    netns_before: list[str] = dataclasses.field(default_factory=list)
    #: Which of :data:`HARD_CODED_PATHS` did not exist before.
    created: list[str] = dataclasses.field(default_factory=list)
    #: name -> [pid, executable] of every process the node started.
    processes: dict[str, list[int | str]] = dataclasses.field(default_factory=dict)

    @property
    def file(self) -> Path:
        return Path(self.directory) / "footprint.json"

    def save(self) -> None:
        tmp = self.file.with_suffix(".partial")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")
        tmp.replace(self.file)

    @classmethod
    def load(cls, directory: Path) -> Footprint:
        data = json.loads((directory / "footprint.json").read_text())
        return cls(**data)

    def record_process(self, name: str, pid: int, executable: str) -> None:
        self.processes[name] = [pid, executable]
        self.save()


def snapshot(footprint: Footprint) -> Footprint:
    """Fill in what exists before the node changes anything, and save it."""
    for key in KUBELET_SYSCTLS:
        with contextlib.suppress(OSError):
            footprint.sysctls[key] = (Path("/proc/sys") / key).read_text().strip()
    footprint.netns_before = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
    footprint.created = [p for p in HARD_CODED_PATHS if not os.path.lexists(p)]
    footprint.save()
    return footprint


# --------------------------------------------------------------------------------------------------
# Processes


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is(pid: int, executable: str) -> bool:
    """Whether ``pid`` still runs ``executable`` (a recycled pid must not be signalled)."""
    return any(executable in part for part in _cmdline(pid)[:3])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def stop_processes(footprint: Footprint) -> list[str]:
    """SIGTERM every recorded process still running, SIGKILL what is left after the grace."""
    live = {name: int(pid) for name, (pid, exe) in footprint.processes.items() if _is(int(pid), str(exe))}
    for pid in live.values():
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE
    while any(_alive(pid) for pid in live.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for name, pid in live.items():
        if _alive(pid):
            logger.warning(
                "node process %s (pid %d) ignored SIGTERM for %.0fs; killing it", name, pid, TERM_GRACE
            )
            _signal(pid, signal.SIGKILL)
    return []


def shim_pids(containerd_socket: str) -> list[int]:
    """containerd shims serving the node's containerd (they detach from it and outlive it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = _cmdline(int(entry.name))
            if argv and "containerd-shim" in argv[0] and containerd_socket in argv:
                found.append(int(entry.name))
    return found


def cgroup_dirs(cgroup_root: str) -> list[Path]:
    """Every cgroup of the node's subtree in every hierarchy, deepest first."""
    found: list[Path] = []
    relative = cgroup_root.strip("/")
    if not CGROUP_ROOT.is_dir():
        return found
    for hierarchy in CGROUP_ROOT.iterdir():
        top = hierarchy / relative
        if top.is_dir() and not hierarchy.is_symlink():
            found += [Path(d) for d, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def cgroup_pids_of(folder: Path) -> set[int]:
    with contextlib.suppress(OSError):
        return {int(line) for line in (folder / "cgroup.procs").read_text().split()}
    return set()


def cgroup_pids(cgroup_root: str) -> set[int]:
    pids: set[int] = set()
    for folder in cgroup_dirs(cgroup_root):
        pids |= cgroup_pids_of(folder)
    return pids


def kill_containers(footprint: Footprint, timeout: float = 15.0) -> list[str]:
    """SIGKILL the shims and every process in the node's cgroups until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = set(shim_pids(footprint.containerd_socket)) | cgroup_pids(footprint.cgroup_root)
        pids.discard(os.getpid())
        if not pids:
            return []
        if time.monotonic() > deadline:
            return [f"processes {sorted(pids)} survived SIGKILL"]
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------------
# Mounts, namespaces, links, cgroups, files, kernel settings


def _mount_points() -> list[str]:
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            points.append(fields[4].replace("\\040", " "))
    return points


def node_mounts(footprint: Footprint) -> list[str]:
    """Mounts of the node: anything under its folder, and Pod network namespaces it created."""
    inside = footprint.directory.rstrip("/") + "/"
    before = {str(NETNS_DIR / name) for name in footprint.netns_before}
    found = [
        p
        for p in _mount_points()
        if p.startswith(inside) or (p.startswith(str(NETNS_DIR) + "/") and p not in before)
    ]
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def unmount(points: list[str]) -> list[str]:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    errors = []
    for point in points:
        if libc.umount2(point.encode(), _MNT_DETACH) != 0:
            code = ctypes.get_errno()
            if code not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more); gone
                errors.append(f"umount {point}: {os.strerror(code)}")
    return errors


def _run(argv: list[str]) -> str | None:
    """Run a cleanup command; None on success, else its error (a missing object is success)."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if done.returncode == 0:
        return None
    message = done.stderr.strip()
    if "Cannot find device" in message or "No such file" in message or "does not exist" in message:
        return None
    return f"`{' '.join(argv)}`: {message}"


def remove_network(footprint: Footprint) -> list[str]:
    errors = []
    for name in sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []:
        if name not in footprint.netns_before and name != footprint.netns and name.startswith("cni-"):
            with contextlib.suppress(FileNotFoundError):
                (NETNS_DIR / name).unlink()
    for argv in (["ip", "link", "del", footprint.host_veth], ["ip", "netns", "del", footprint.netns]):
        error = _run(argv)
        if error:
            errors.append(error)
    return errors


def remove_cgroups(footprint: Footprint) -> list[str]:
    errors = []
    for folder in cgroup_dirs(footprint.cgroup_root):
        try:
            folder.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(f"rmdir {folder}: {exc.strerror}")
    return errors


def sandbox_ids(footprint: Footprint) -> set[str]:
    """Ids of every Pod sandbox the node's containerd made (from its folders, which outlive it)."""
    containerd = Path(footprint.containerd_socket).parent
    ids: set[str] = set()
    for folder in (
        containerd / "root" / "io.containerd.grpc.v1.cri" / "sandboxes",
        containerd / "state" / "io.containerd.runtime.v2.task" / "k8s.io",
    ):
        if folder.is_dir():
            ids.update(p.name for p in folder.iterdir() if len(p.name) == 64)
    return ids


def remove_host_files(footprint: Footprint) -> list[str]:
    """The kubelet's and libcni's files outside the node's folder, and folders the node created."""
    errors = []
    inside = footprint.directory.rstrip("/") + "/"
    logs = Path("/var/log/containers")
    if logs.is_dir():
        for link in logs.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(inside):
                    link.unlink()
    results = Path("/var/lib/cni/results")
    if results.is_dir():
        # <network>-<sandbox id>-<interface>: the node's bridge network, and containerd's own
        # loopback network ("cni-loopback") for the node's sandboxes.
        sandboxes = sandbox_ids(footprint)
        for entry in results.iterdir():
            ours = entry.name.startswith(f"{footprint.cni_network}-") or any(
                s in entry.name for s in sandboxes
            )
            if ours:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
    for path in sorted(footprint.created, key=lambda p: p.count("/"), reverse=True):
        target = Path(path)
        try:
            if target.is_dir() and not target.is_symlink():
                target.rmdir()  # only when empty: what another node (or anything else) put there stays
            elif os.path.lexists(target):
                target.unlink()
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                errors.append(f"remove {target}: {exc.strerror}")
    return errors


def restore_sysctls(footprint: Footprint) -> list[str]:
    errors = []
    for key, value in footprint.sysctls.items():
        path = Path("/proc/sys") / key
        try:
            if path.read_text().strip() != value:
                path.write_text(value)
        except OSError as exc:
            errors.append(f"restore {key}={value}: {exc.strerror}")
    return errors


def pod_netns(footprint: Footprint, sandboxes: set[str]) -> set[str]:
    """Names (in /run/netns) of the network namespaces of the node's Pods, from libcni's results."""
    found: set[str] = set()
    results = Path("/var/lib/cni/results")
    for entry in results.iterdir() if results.is_dir() else []:
        if entry.name.startswith(f"{footprint.cni_network}-") or any(s in entry.name for s in sandboxes):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                for interface in json.loads(entry.read_text())["result"]["interfaces"]:
                    if interface.get("sandbox"):
                        found.add(Path(interface["sandbox"]).name)
    return found


def remaining(footprint: Footprint, sandboxes: set[str], netns: set[str]) -> list[str]:
    """What of the node is still on the host (empty after a complete clean).

    ``sandboxes`` and ``netns``: :func:`sandbox_ids` and :func:`pod_netns`, taken while the node
    ran (its folders and libcni's results are gone afterwards).
    """
    left = []
    inside = footprint.directory.rstrip("/") + "/"
    for entry in Path("/proc").iterdir():
        argv = _cmdline(int(entry.name)) if entry.name.isdigit() else []
        if any(inside in part or part == footprint.directory for part in argv) and KEEPER_MODULE not in argv:
            left.append(f"process {entry.name}: {' '.join(argv)[:160]}")
    left += [
        f"mount {point}" for point in _mount_points() if point.startswith(inside) or Path(point).name in netns
    ]
    for name in {footprint.netns, *netns}:
        if (NETNS_DIR / name).exists():
            left.append(f"network namespace {name}")
    if Path("/sys/class/net", footprint.host_veth).exists():
        left.append(f"link {footprint.host_veth}")
    left += [f"cgroup {folder}" for folder in cgroup_dirs(footprint.cgroup_root)]
    results = Path("/var/lib/cni/results")
    for entry in results.iterdir() if results.is_dir() else []:
        if entry.name.startswith(f"{footprint.cni_network}-") or any(s in entry.name for s in sandboxes):
            left.append(f"CNI result {entry}")
    logs = Path("/var/log/containers")
    for link in logs.iterdir() if logs.is_dir() else []:
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(inside):
                left.append(f"log link {link}")
    for key, value in footprint.sysctls.items():
        with contextlib.suppress(OSError):
            now = (Path("/proc/sys") / key).read_text().strip()
            if now != value:
                left.append(f"sysctl {key}={now} (was {value})")
    return left


def clean(footprint: Footprint) -> list[str]:
    """Undo everything the node did outside its folder (see the module docstring); the errors."""
    errors: list[str] = []
    for step in (
        stop_processes,
        kill_containers,
        lambda f: unmount(node_mounts(f)),
        remove_network,
        remove_cgroups,
        remove_host_files,
        restore_sysctls,
    ):
        try:
            errors += step(footprint)
        except Exception as exc:  # one failed step must not keep the others from running
            logger.exception("node cleanup step failed")
            errors.append(f"{getattr(step, '__name__', 'step')}: {exc}")
    return errors
