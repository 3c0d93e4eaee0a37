"""Build the hub and agent images (``nox -s images``), also on a machine that can pull nothing.

Steps, each reported as it goes and each skipped when its result is already there:

1. **A Docker engine.** ``docker info`` answers, or (as root on Linux) Debian's ``docker.io`` is
   installed with apt when ``dockerd`` is missing and ``dockerd`` is started by hand: overlay2,
   cgroupfs, and no bridge, iptables rules or IP forwarding, so it changes nothing in the host's
   network (builds then use the host network). It keeps running for later builds; its log is
   ``<cache>/docker/dockerd.log``.
2. **Base images.** Where a registry answers, the Dockerfiles' defaults (``python:3.11-slim-bookworm``,
   ``golang:1.26-bookworm``) are used as they are. Where it does not:

   - Python: a Debian bookworm root filesystem made with ``debootstrap`` (python3 3.11,
     python3-venv, libpython3.11 for Envoy's embedded interpreter, tini, ca-certificates),
     imported as ``local/otterscale-python:<key>``. ``<key>`` is a hash of the recipe (suite,
     variant, packages, mirror, this module's recipe version), so
     the image is rebuilt exactly when what goes into it changes; the root filesystem is kept as a
     tarball in ``<cache>/images/base/<key>.tar`` with its package list, and a warm run only
     imports it (seconds) or finds the image already there.
   - chisel: the tools cache's binary (``nox -s tools -- chisel``, built by the host's Go at
     the pinned version) imported as ``local/otterscale-chisel:<version>``.
3. **The images**, built with BuildKit from ``docker/*.Dockerfile`` with those build arguments,
   tagged ``<registry>/otterscale-<name>:<package version>`` (what the charts reference). pip's CA
   bundle of this machine (``PIP_CERT``, ``REQUESTS_CA_BUNDLE`` or ``SSL_CERT_FILE``) is handed to
   the build as the ``pip-ca`` secret, so a TLS-intercepting proxy works without a trace in the image.
4. **Checks, for real**: each image runs as 65532 with a read-only root, no capabilities and no
   network; ``--help`` works; the hub starts with the README's sample configuration, answers
   ``/readyz`` and stops cleanly on SIGTERM (tini forwards it).
5. **Archives** for clusters without Docker (the test node imports them into its containerd):
   ``docker save`` of each image, and of the Python base, into ``<cache>/images/`` with an index,
   ``images.json`` (:func:`load_index`). An archive whose image has not changed is not rewritten.

``<cache>`` is ``~/.cache/otterscale`` (``OTTERSCALE_TOOLS_DIR`` moves it). Standard library only:
``nox -s images`` runs it before anything is installed. ``python -m otterscale.testing.images --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

if __package__:
    from . import tools
else:  # run as a script (``nox -s images``), before anything is installed: tools.py beside it
    import importlib.util

    _spec = importlib.util.spec_from_file_location("otterscale_tools", Path(__file__).with_name("tools.py"))
    assert _spec is not None
    assert _spec.loader is not None
    tools = importlib.util.module_from_spec(_spec)  # type: ignore[assignment]
    sys.modules[_spec.name] = tools  # its dataclasses look their module up
    _spec.loader.exec_module(tools)

CHISEL_VERSION = tools.CHISEL_VERSION
cache_root = tools.cache_root

#: Where the hub and agent images are tagged by default (the charts' ``image.repository``).
REGISTRY = "ghcr.io/otterscale"
#: name -> Dockerfile (relative to the repository root); the build context is the root.
DOCKERFILES = {"otterscale-hub": "docker/hub.Dockerfile", "otterscale-agent": "docker/agent.Dockerfile"}
#: The Dockerfiles' default bases (their ``ARG`` defaults); used when they can be pulled.
REGISTRY_PYTHON_IMAGE = "python:3.11-slim-bookworm"

#: The Debian base made with debootstrap where no Python image can be pulled. Bump
#: ``BASE_RECIPE_VERSION`` when :func:`_make_rootfs` changes what ends up in the image.
BASE_RECIPE_VERSION = "1"
BASE_SUITE = "bookworm"
BASE_VARIANT = "minbase"
#: libpython3.11: the services run inside Envoy, whose embedded interpreter (pyvoy) loads the
#: shared libpython (Debian's python3 executable is linked statically; the official images ship it).
BASE_PACKAGES = ("python3", "python3-venv", "libpython3.11", "tini", "ca-certificates")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_REPOSITORY = "local/otterscale-python"
CHISEL_REPOSITORY = "local/otterscale-chisel"
#: What the base image's environment is (``docker import`` sets none; the Dockerfiles extend PATH).
_BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
#: Paths left out of the base image: caches, docs and logs nothing at run time needs.
_ROOTFS_PRUNE = (
    "var/cache/apt/archives",
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
    "var/cache/debconf/templates.dat-old",
    "var/lib/apt/lists",
    "var/log",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)

#: Seconds: a Docker engine to answer after dockerd started; a started hub to answer /readyz.
ENGINE_START_TIMEOUT = 60.0
HUB_READY_TIMEOUT = 60.0

INDEX_NAME = "images.json"
#: The index key of the Python base (what tests run plain Pods from).
PYTHON_KEY = "python"


class ImageBuildError(RuntimeError):
    """A step of the image build failed; the message says which and why."""


def _log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def images_dir() -> Path:
    """``<cache>/images``: base root filesystems, image archives and their index."""
    return cache_root() / "images"


# --------------------------------------------------------------------------------------------------
# The Docker engine


@dataclasses.dataclass(frozen=True)
class Docker:
    """How to call the engine: the client, the ``build`` command (BuildKit) and its environment."""

    client: str
    build: tuple[str, ...]
    env: Mapping[str, str]
    #: Builds run on the host network: the engine has no bridge (we started it without one).
    host_network: bool

    def run(self, *args: str, check: bool = True, timeout: float = 600, stdin: Path | None = None) -> str:
        """``docker ARGS``; its stdout (ImageBuildError with stderr if it fails and ``check``)."""
        with contextlib.ExitStack() as stack:
            data = stack.enter_context(stdin.open("rb")) if stdin is not None else subprocess.DEVNULL
            done = subprocess.run(
                [self.client, *args],
                stdin=data,
                capture_output=True,
                env=dict(self.env),
                timeout=timeout,
                check=False,
            )
        if check and done.returncode != 0:
            stderr = done.stderr.decode(errors="replace").strip()
            raise ImageBuildError(f"`docker {' '.join(args[:3])} ...` failed ({done.returncode}): {stderr}")
        return done.stdout.decode(errors="replace")

    def logs(self, container: str) -> str:
        """The container's output, stdout and stderr (``docker logs`` replays each to its own)."""
        done = subprocess.run(
            [self.client, "logs", container], capture_output=True, env=dict(self.env), timeout=60, check=False
        )
        return (done.stdout + done.stderr).decode(errors="replace")

    def image_id(self, ref: str) -> str | None:
        done = subprocess.run(
            [self.client, "image", "inspect", "--format", "{{.Id}}", ref],
            capture_output=True,
            text=True,
            env=dict(self.env),
            timeout=60,
            check=False,
        )
        return done.stdout.strip() if done.returncode == 0 else None


def _answers(client: str) -> tuple[bool, str]:
    try:
        done = subprocess.run(
            [client, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    reason = (done.stderr.strip().splitlines() or ["no answer"])[-1]
    return done.returncode == 0 and bool(done.stdout.strip()), reason


def _buildkit(client: str) -> tuple[tuple[str, ...], dict[str, str]] | None:
    """The build command of ``client`` that uses BuildKit, or None (a client >= 23 without buildx)."""
    env = dict(os.environ)
    plugin = subprocess.run([client, "buildx", "version"], capture_output=True, text=True, check=False)
    if plugin.returncode == 0:
        return (client, "buildx", "build", "--load"), env
    version = subprocess.run(
        [client, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True, check=False
    ).stdout.strip()
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return None
    if major < 23:  # the classic client still drives BuildKit itself
        env["DOCKER_BUILDKIT"] = "1"
        return (client, "build"), env
    return None


def _start_dockerd(log: Path) -> None:
    """Start Debian's dockerd by hand, detached (it outlives this run, as a system service would)."""
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).is_file():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise ImageBuildError(
                "no Docker engine answers and dockerd is not installed: install Docker "
                "(Debian: `apt-get install docker.io`) or start your engine"
            )
        _log("installing Debian's docker.io (apt-get)...")
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "docker.io"]):
            done = subprocess.run(
                argv, capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            )
            if done.returncode != 0:
                raise ImageBuildError(f"`{' '.join(argv)}` failed: {done.stderr.strip()[-2000:]}")
        dockerd = "/usr/sbin/dockerd"
    if os.geteuid() != 0:
        raise ImageBuildError("no Docker engine answers, and starting dockerd needs root")
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        dockerd,
        "--storage-driver=overlay2",
        "--exec-opt=native.cgroupdriver=cgroupfs",
        # No docker0, no NAT rules, no ip_forward: the host's network stays as it is.
        "--bridge=none",
        "--iptables=false",
        "--ip-forward=false",
        "--ip-masq=false",
    ]
    _log(f"starting {' '.join(argv)} (log {log})")
    with log.open("ab") as out:
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def docker_engine(*, start: bool = True) -> Docker:
    """A Docker engine that answers, with a BuildKit-capable client (started here if need be)."""
    clients = [
        c for c in dict.fromkeys((shutil.which("docker"), "/usr/bin/docker")) if c and Path(c).is_file()
    ]
    answering = [c for c in clients if _answers(c)[0]]
    if not answering:
        if not start:
            raise ImageBuildError("no Docker engine answers (`docker info` failed)")
        log = cache_root() / "docker" / "dockerd.log"
        _start_dockerd(log)
        clients = [
            c for c in dict.fromkeys((shutil.which("docker"), "/usr/bin/docker")) if c and Path(c).is_file()
        ]
        deadline = time.monotonic() + ENGINE_START_TIMEOUT
        while not (answering := [c for c in clients if _answers(c)[0]]):
            if time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise ImageBuildError(
                    f"dockerd did not answer within {ENGINE_START_TIMEOUT:.0f}s; {log}:\n{tail}"
                )
            time.sleep(0.5)
    for client in answering:
        found = _buildkit(client)
        if found is not None:
            build, env = found
            bridge = subprocess.run(
                [client, "network", "inspect", "bridge"], capture_output=True, text=True, env=env, check=False
            )
            return Docker(client, build, env, host_network=bridge.returncode != 0)
    raise ImageBuildError(
        f"the Docker client(s) {', '.join(answering)} cannot build with BuildKit: install the buildx plugin"
    )


# --------------------------------------------------------------------------------------------------
# Base images


def pullable(docker: Docker, ref: str) -> bool:
    """Whether ``ref`` is here or can be pulled now."""
    if docker.image_id(ref):
        return True
    _log(f"pulling {ref}...")
    done = subprocess.run(
        [docker.client, "pull", "--quiet", ref],
        capture_output=True,
        text=True,
        env=dict(docker.env),
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        _log(f"  cannot pull {ref}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done.returncode == 0


def base_recipe() -> dict[str, object]:
    """Everything that decides what the debootstrap base contains (its cache key is a hash of it)."""
    return {
        "recipe": BASE_RECIPE_VERSION,
        "suite": BASE_SUITE,
        "variant": BASE_VARIANT,
        "packages": sorted(BASE_PACKAGES),
        "mirror": DEBIAN_MIRROR,
        "prune": sorted(_ROOTFS_PRUNE),
        "changes": list(_BASE_CHANGES),
    }


def base_key() -> str:
    return hashlib.sha256(json.dumps(base_recipe(), sort_keys=True).encode()).hexdigest()[:16]


def base_ref() -> str:
    return f"{BASE_REPOSITORY}:3.11-{BASE_SUITE}-{base_key()}"


def _make_rootfs(target: Path) -> None:
    """debootstrap the base into ``target`` and prune it (needs root and debootstrap)."""
    if shutil.which("debootstrap") is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            _log("installing debootstrap (apt-get)...")
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "debootstrap"],
                check=True,
                capture_output=True,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
        else:
            raise ImageBuildError(
                "no Python base image can be pulled and debootstrap is missing (apt-get install debootstrap)"
            )
    if os.geteuid() != 0:
        raise ImageBuildError("no Python base image can be pulled, and debootstrap needs root")
    argv = [
        "debootstrap",
        f"--variant={BASE_VARIANT}",
        f"--include={','.join(BASE_PACKAGES)}",
        BASE_SUITE,
        str(target),
        DEBIAN_MIRROR,
    ]
    _log("$ " + " ".join(argv) + "  (1-3 minutes)")
    log = target.with_name(target.name + ".log")
    with log.open("wb") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise ImageBuildError(f"debootstrap failed ({done.returncode}); {log}:\n{tail}")
    _prune_rootfs(target)


def _prune_rootfs(target: Path) -> None:
    for rel in _ROOTFS_PRUNE:
        path = target / rel
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        elif path.exists():
            path.unlink()


def _packages(rootfs: Path) -> list[str]:
    """``name=version`` of every installed package (from dpkg's status file)."""
    found, name = [], ""
    status = (rootfs / "var/lib/dpkg/status").read_text(errors="replace")
    for line in status.splitlines():
        if line.startswith("Package: "):
            name = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and name:
            found.append(f"{name}={line.split(': ', 1)[1]}")
    return sorted(found)


def _tar_rootfs(rootfs: Path, archive: Path) -> None:
    """The root filesystem as a tarball (``/dev``, ``/proc``, ``/sys`` and ``/run`` left empty)."""
    skip = {"dev", "proc", "sys", "run"}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if len(parts) > 2 and parts[1] in skip:  # ("." , "dev", "null")
            return None
        return info

    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(rootfs, arcname=".", filter=keep)


def python_base(docker: Docker) -> str:
    """The debootstrap base image (imported from the cached tarball, made when missing)."""
    ref = base_ref()
    if docker.image_id(ref):
        _log(f"base {ref}: present")
        return ref
    folder = images_dir() / "base"
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / f"{base_key()}.tar"
    if not archive.is_file():
        started = time.monotonic()
        scratch = Path(tempfile.mkdtemp(prefix="rootfs-", dir=folder))
        try:
            rootfs = scratch / "rootfs"
            _make_rootfs(rootfs)
            (folder / f"{base_key()}.packages").write_text("\n".join(_packages(rootfs)) + "\n")
            (folder / f"{base_key()}.recipe.json").write_text(json.dumps(base_recipe(), indent=2) + "\n")
            partial = archive.with_suffix(".partial")
            _tar_rootfs(rootfs, partial)
            partial.rename(archive)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _log(f"base root filesystem made in {time.monotonic() - started:.0f}s: {archive} ({_mb(archive)})")
    started = time.monotonic()
    changes = [arg for change in _BASE_CHANGES for arg in ("--change", change)]
    docker.run(
        "import", *changes, "--message", f"debootstrap {BASE_SUITE} {base_key()}", "-", ref, stdin=archive
    )
    _log(f"base {ref}: imported in {time.monotonic() - started:.0f}s")
    return ref


def chisel_image(docker: Docker) -> str:
    """``local/otterscale-chisel:<version>``: the tools cache's chisel at ``/out/chisel``."""
    ref = f"{CHISEL_REPOSITORY}:{CHISEL_VERSION}"
    binary = tools.TOOLS["chisel"].path
    if not binary.is_file():
        raise ImageBuildError(
            f"chisel {CHISEL_VERSION} is not built (expected at {binary}): nox -s tools -- chisel"
        )
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()
    label = docker.run("image", "inspect", "--format", "{{.Comment}}", ref, check=False).strip()
    if label == f"chisel {digest}":
        return ref
    with tempfile.TemporaryDirectory(prefix="chisel-image-") as tmp:
        layer = Path(tmp) / "chisel.tar"
        with tarfile.open(layer, mode="w") as tar:
            info = tar.gettarinfo(str(binary), arcname="out/chisel")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with binary.open("rb") as f:
                tar.addfile(info, f)
        docker.run("import", "--message", f"chisel {digest}", "-", ref, stdin=layer)
    _log(f"chisel image {ref} from {binary}")
    return ref


# --------------------------------------------------------------------------------------------------
# The images


def _package_version(root: Path, name: str) -> str:
    package = name.removeprefix("otterscale-")
    data = tomllib.loads((root / "packages" / package / "pyproject.toml").read_text())
    return str(data["project"]["version"])


def ca_bundle(environ: Mapping[str, str] | None = None) -> Path | None:
    """The CA bundle pip uses on this machine, if one is configured (see the module docstring)."""
    env = os.environ if environ is None else environ
    for key in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = env.get(key)
        if value and Path(value).is_file():
            return Path(value)
    return None


def build_argv(
    docker: Docker, root: Path, name: str, tag: str, build_args: Mapping[str, str], ca: Path | None
) -> list[str]:
    argv = [*docker.build, "--file", str(root / DOCKERFILES[name]), "--tag", tag]
    for key, value in build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    if ca is not None:
        argv += ["--secret", f"id=pip-ca,src={ca}"]
    if docker.host_network:
        argv += ["--network", "host"]
    argv.append(str(root))
    return argv


def build_images(docker: Docker, root: Path, registry: str, build_args: Mapping[str, str]) -> dict[str, str]:
    """Build both images; returns name -> tag."""
    tags = {}
    ca = ca_bundle()
    for name in DOCKERFILES:
        tag = f"{registry}/{name}:{_package_version(root, name)}"
        argv = build_argv(docker, root, name, tag, build_args, ca)
        _log("$ " + " ".join(argv))
        started = time.monotonic()
        done = subprocess.run(argv, env=dict(docker.env), cwd=root, check=False)
        if done.returncode != 0:
            raise ImageBuildError(f"building {tag} failed ({done.returncode}); the build output is above")
        _log(f"built {tag} in {time.monotonic() - started:.0f}s ({_image_size(docker, tag)})")
        tags[name] = tag
    return tags


def _image_size(docker: Docker, ref: str) -> str:
    size = docker.run("image", "inspect", "--format", "{{.Size}}", ref, check=False).strip()
    return f"{int(size) / 1e6:.0f} MB" if size.isdigit() else "size unknown"


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.0f} MB"


# --------------------------------------------------------------------------------------------------
# Checks


#: How every check runs a container: as the charts run it (non-root, read-only root, no
#: capabilities, a writable /tmp only) and without network.
_LOCKED_DOWN = (
    "--read-only",
    "--tmpfs=/tmp:rw,size=64m",
    "--user=65532:65532",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
    "--network=none",
)

#: The original service's sample otterscale.yaml, verbatim (tests/install starts the installed
#: hub with it too; otterscale-common's config tests parse it). Its example secrets are refused
#: by the hub: every user replaces them.
SAMPLE_CONFIG = """\
keycloak:
  # OIDC issuer URL for your Keycloak realm, for example:
  # https://keycloak.example.com/realms/<realm>
  realm_url: "https://keycloak.example.com/realms/otterscale"
  # OIDC client ID used to verify ID tokens.
  client_id: "otterscale"

tunnel:
  server:
    # Bind address for the embedded Chisel reverse-tunnel server.
    host: "0.0.0.0"
    port: "8300"
    # Provide ONE of the following:
    # key_file: "/path/to/chisel-ecdsa-privatekey.pem"
    key_seed: "change-me"

clusters:
  dev:
    agent:
      # Basic auth used by the agent when connecting to the server tunnel.
      auth:
        user: "dev-agent"
        pass: "dev-agent-password"
      # Expected server tunnel fingerprint (agent-side). This is printed by the server on startup.
      fingerprint: "SERVER_TUNNEL_FINGERPRINT"
      # Reverse tunnel port opened on the SERVER loopback interface (127.0.0.1:<tunnel_port>).
      tunnel_port: 51001
      # Agent local API port that will be exposed through the tunnel.
      api_port: 8299
"""

_READYZ_PROBE = (
    "import sys, urllib.request, urllib.error\n"
    "try:\n"
    "    print(urllib.request.urlopen('http://127.0.0.1:8299/readyz', timeout=2).status)\n"
    "except urllib.error.HTTPError as exc:\n"
    "    print(exc.code)\n"
    "except OSError as exc:\n"
    "    print('down', exc)\n"
)


def check_image(docker: Docker, name: str, tag: str) -> None:
    """Run the image for real (see the module docstring); raises :class:`ImageBuildError`."""
    user = docker.run("image", "inspect", "--format", "{{.Config.User}}", tag).strip()
    if user != "65532:65532":
        raise ImageBuildError(f"{tag} runs as {user!r}, not 65532:65532")
    command = "server" if name == "otterscale-hub" else "agent"
    for args in (["--help"], [command, "--help"]):
        out = docker.run("run", "--rm", *_LOCKED_DOWN, tag, *args, timeout=120)
        if command not in out:
            raise ImageBuildError(f"`{tag} {' '.join(args)}` printed no `{command}`:\n{out}")
    # The charts' init container runs `python -I merge-config.py` from this image: python and PyYAML.
    docker.run(
        "run", "--rm", *_LOCKED_DOWN, "--entrypoint", "python", tag, "-I", "-c", "import yaml", timeout=120
    )
    if name == "otterscale-hub":
        _check_hub_serves(docker, tag)
    _log(
        f"checked {tag}: runs as 65532 with a read-only root; --help works"
        + ("; /readyz 200 with the sample config; SIGTERM -> exit 0" if name == "otterscale-hub" else "")
    )


def _check_hub_serves(docker: Docker, tag: str) -> None:
    with tempfile.TemporaryDirectory(prefix="otterscale-image-check-") as tmp:
        config = Path(tmp) / "otterscale.yaml"
        seed, password = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        text = SAMPLE_CONFIG.replace('host: "0.0.0.0"', 'host: "127.0.0.1"')  # the tunnel on loopback
        config.write_text(text.replace("change-me", seed).replace("dev-agent-password", password))
        config.chmod(0o644)  # read by uid 65532 through the bind mount
        container = docker.run(
            "run",
            "--detach",
            *_LOCKED_DOWN,
            "--volume",
            f"{config}:/etc/app/otterscale.yaml:ro",
            tag,
            "server",
        ).strip()
        try:
            deadline = time.monotonic() + HUB_READY_TIMEOUT
            while True:
                state = docker.run("inspect", "--format", "{{.State.Running}}", container).strip()
                if state != "true":
                    logs = docker.logs(container)
                    raise ImageBuildError(f"the hub in {tag} exited before /readyz answered:\n{logs[-3000:]}")
                answer = docker.run(
                    "exec", container, "python", "-I", "-c", _READYZ_PROBE, check=False, timeout=30
                ).strip()
                if answer == "200":
                    break
                if time.monotonic() > deadline:
                    logs = docker.logs(container)
                    raise ImageBuildError(
                        f"the hub in {tag}: /readyz {answer} after {HUB_READY_TIMEOUT:.0f}s:\n{logs[-3000:]}"
                    )
                time.sleep(0.5)
            docker.run("stop", "--time", "30", container, timeout=60)
            code = docker.run("inspect", "--format", "{{.State.ExitCode}}", container).strip()
            logs = docker.logs(container)
            if code != "0":
                raise ImageBuildError(f"the hub in {tag} exited with {code} on SIGTERM:\n{logs[-3000:]}")
            for secret in (seed, password):
                if secret in logs:
                    raise ImageBuildError(f"the hub in {tag} logged a secret of the sample configuration")
        finally:
            docker.run("rm", "--force", container, check=False)


# --------------------------------------------------------------------------------------------------
# Archives for the test node


def load_index(directory: Path | None = None) -> dict[str, dict[str, str]]:
    """``images.json``: key -> {"ref", "id", "archive"} of every saved image (empty if none)."""
    path = (directory or images_dir()) / INDEX_NAME
    try:
        loaded: dict[str, dict[str, str]] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded


def save_archives(docker: Docker, refs: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``docker save`` each image whose archive is missing or stale; update the index."""
    folder = images_dir()
    folder.mkdir(parents=True, exist_ok=True)
    index = load_index(folder)
    for key, ref in refs.items():
        image_id = docker.image_id(ref)
        if image_id is None:
            raise ImageBuildError(f"{ref} is not in the engine")
        archive = folder / f"{key}.tar"
        entry = index.get(key, {})
        if entry.get("id") == image_id and entry.get("ref") == ref and archive.is_file():
            continue
        started = time.monotonic()
        partial = archive.with_suffix(".partial")
        docker.run("save", "--output", str(partial), ref, timeout=900)
        partial.rename(archive)
        index[key] = {"ref": ref, "id": image_id, "archive": str(archive)}
        _log(f"saved {ref} -> {archive} ({_mb(archive)}) in {time.monotonic() - started:.0f}s")
    tmp = folder / (INDEX_NAME + ".partial")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    tmp.replace(folder / INDEX_NAME)
    return index


# --------------------------------------------------------------------------------------------------
# Command line


def repo_root() -> Path:
    for parent in Path(__file__).resolve().parents:
        if (parent / "docker" / "hub.Dockerfile").is_file():
            return parent
    raise ImageBuildError("docker/hub.Dockerfile not found: build the images from a source checkout")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m otterscale.testing.images",
        description="Build, check and save the hub and agent images (see the module docstring).",
    )
    parser.add_argument("--registry", default=REGISTRY, help=f"image name prefix (default {REGISTRY})")
    parser.add_argument(
        "--base",
        choices=("auto", "registry", "debootstrap"),
        default="auto",
        help="auto: the Dockerfiles' defaults when they can be pulled, else debootstrap and the tools "
        "cache's chisel (default); registry: the defaults only; debootstrap: never pull",
    )
    parser.add_argument("--no-check", action="store_true", help="skip running the built images")
    parser.add_argument("--no-save", action="store_true", help="skip the archives for the test node")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        root = repo_root()
        docker = docker_engine()
        _log(
            f"engine: {docker.client} ({' '.join(docker.build)}"
            f"{', host network' if docker.host_network else ''})"
        )
        build_args = {"CHISEL_VERSION": CHISEL_VERSION}
        python_ref = REGISTRY_PYTHON_IMAGE
        use_registry = args.base == "registry" or (args.base == "auto" and pullable(docker, python_ref))
        if not use_registry:
            python_ref = python_base(docker)
            build_args.update(PYTHON_IMAGE=python_ref, CHISEL_IMAGE=chisel_image(docker))
        tags = build_images(docker, root, args.registry, build_args)
        if not args.no_check:
            for name, tag in tags.items():
                check_image(docker, name, tag)
        if not args.no_save:
            save_archives(docker, {**tags, PYTHON_KEY: python_ref})
    except (ImageBuildError, subprocess.CalledProcessError, OSError) as exc:
        _log(f"FAILED: {exc}")
        return 1
    _log(f"done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
