"""Build the pinned external tools (chisel, etcd, kube-apiserver, ...) from the Go module proxy,
and fetch the pinned Keycloak distribution from Maven Central.

The node tools (kubelet, kube-scheduler, kube-proxy, pause, coredns: :data:`NODE_TOOLS`) are built
the same way, on request only (``nox -s tools -- node``): a real single-node cluster needs them
(``otterscale.testing._node``), the control-plane fixtures do not.

Everything lands in a cache outside the repository, one folder per tool and version
(default ``~/.cache/otterscale/bin/<tool>-<version>/<tool>`` for Go binaries and
``~/.cache/otterscale/keycloak-<version>/`` for Keycloak, overridable with
``OTTERSCALE_TOOLS_DIR``), so a second run skips everything that is already there. Downloads are
verified against the checksum Maven Central publishes beside the artifact.

Standard library only: ``nox -s tools`` runs this before any dependency is installed.
Run ``python -m otterscale.testing.tools --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

#: Kubernetes release the control plane is built from; staging modules use ``v0.<minor>.<patch>``.
KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
#: >= v1.11.5 checks allowed remotes per connection; v1.12 adds server-side keepalive timeouts.
CHISEL_VERSION = "v1.12.0"
HELM_VERSION = "v3.22.0"
GRPCURL_VERSION = "v1.9.3"
#: ``org.keycloak:keycloak-quarkus-dist``; 26.x runs on Java 17, 21 and 25.
KEYCLOAK_VERSION = "26.7.3"
#: Cluster DNS of the node (a minimal plugin set, :data:`_COREDNS_MAIN`).
COREDNS_VERSION = "v1.15.0"
#: The node's sandbox (pause) program, :data:`_PAUSE_MAIN`; bump it when that source changes.
PAUSE_VERSION = "v1.0.0"

GO_PROXY_DEFAULT = "https://proxy.golang.org"
MAVEN_CENTRAL = "https://repo1.maven.org/maven2"


def cache_root() -> Path:
    """The tools cache: ``$OTTERSCALE_TOOLS_DIR`` or ``~/.cache/otterscale``."""
    env = os.environ.get("OTTERSCALE_TOOLS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "otterscale"


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    version: str
    #: The tool's folder under the cache root (default ``bin/<name>-<version>``).
    folder: str = ""
    #: The entry point inside that folder (default: a binary named like the tool).
    entry: str = ""
    #: Built with Go (needs ``go`` on PATH) rather than downloaded.
    go: bool = True

    @property
    def home(self) -> Path:
        return cache_root() / (self.folder or f"bin/{self.name}-{self.version}")

    @property
    def path(self) -> Path:
        return self.home / (self.entry or self.name)


TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool("chisel", CHISEL_VERSION),
        Tool("etcd", ETCD_VERSION),
        Tool("kube-apiserver", KUBERNETES_VERSION),
        Tool("kube-controller-manager", KUBERNETES_VERSION),
        Tool("kubelet", KUBERNETES_VERSION),
        Tool("kube-scheduler", KUBERNETES_VERSION),
        Tool("kube-proxy", KUBERNETES_VERSION),
        Tool("pause", PAUSE_VERSION),
        Tool("coredns", COREDNS_VERSION),
        Tool("helm", HELM_VERSION),
        Tool("grpcurl", GRPCURL_VERSION),
        Tool(
            "keycloak", KEYCLOAK_VERSION, folder=f"keycloak-{KEYCLOAK_VERSION}", entry="bin/kc.sh", go=False
        ),
    )
}

#: What ``nox -s tools`` builds when asked for nothing in particular.
DEFAULT_TOOLS = (
    "chisel",
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "helm",
    "grpcurl",
    "keycloak",
)

#: What a real node needs on top of the control plane (``nox -s tools -- node`` builds them).
NODE_TOOLS = ("kubelet", "kube-scheduler", "kube-proxy", "pause", "coredns")

#: Names ``nox -s tools -- NAME`` accepts for a group of tools.
GROUPS = {"node": NODE_TOOLS}


class ToolMissingError(RuntimeError):
    """A binary a test or service needs has not been built yet."""


def tool_path(name: str) -> Path:
    """Path of a built tool, or :class:`ToolMissingError` naming the command that builds it."""
    tool = TOOLS[name]
    if not tool.path.is_file():
        raise ToolMissingError(
            f"{name} {tool.version} is not built (expected at {tool.path}); "
            f"build it with: nox -s tools -- {name}"
        )
    return tool.path


def keycloak_home() -> Path:
    """The unpacked Keycloak distribution (``bin/kc.sh``, ``lib/``, ``conf/``, ...).

    Raises :class:`ToolMissingError` naming the command that fetches it.
    """
    return tool_path("keycloak").parent.parent


def _log(msg: str) -> None:
    print(f"[tools] {msg}", file=sys.stderr, flush=True)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CGO_ENABLED="0", GOTOOLCHAIN="local", GOFLAGS="-mod=mod -buildvcs=false")
    env.setdefault("GOPROXY", GO_PROXY_DEFAULT)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    _log("$ " + " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def _fetch_mod(module: str, version: str) -> str:
    proxy = _go_env()["GOPROXY"].split(",")[0]
    url = f"{proxy}/{module}/@v/{version}.mod"
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - fixed https proxy
        data: bytes = resp.read()
    return data.decode()


def _staging_replaces(k8s_version: str) -> list[str]:
    """The ``k8s.io/<x> => ./staging/...`` modules of a Kubernetes release, as published versions."""
    staging_version = "v0." + k8s_version.removeprefix("v1.")
    lines = []
    for line in _fetch_mod("k8s.io/kubernetes", k8s_version).splitlines():
        line = line.strip()
        if "=> ./staging/" in line:
            module = line.split()[0]
            lines.append(f"\t{module} => {module} {staging_version}")
    if not lines:
        raise RuntimeError(f"no staging replaces found in k8s.io/kubernetes {k8s_version} go.mod")
    return lines


def _build_in_wrapper(
    tool: Tool, go_mod: str, package: str, ldflags: str = "", workdir_name: str | None = None
) -> None:
    """Build ``package`` inside a throw-away wrapper module whose ``go.mod`` is ``go_mod``."""
    src = cache_root() / "src" / (workdir_name or f"{tool.name}-{tool.version}")
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(go_mod)
    out = tool.path
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".partial")
    cmd = ["go", "build", "-trimpath", "-o", str(tmp_out)]
    if ldflags:
        cmd += ["-ldflags", ldflags]
    cmd.append(package)
    _run(cmd, cwd=src, env=_go_env())
    tmp_out.rename(out)


def _build_kubernetes(tool: Tool) -> None:
    v = tool.version
    replaces = "\n".join(_staging_replaces(v))
    go_mod = textwrap.dedent(
        f"""\
        module otterscale.local/k8s-tools

        go 1.26.0

        require k8s.io/kubernetes {v}

        replace (
        {{replaces}}
        )
        """
    ).format(replaces=replaces)
    stamp = " ".join(
        f"-X {pkg}.{key}={value}"
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for key, value in (
            ("gitVersion", v),
            ("gitMajor", "1"),
            ("gitMinor", v.split(".")[1]),
            ("gitTreeState", "clean"),
            ("buildDate", "1970-01-01T00:00:00Z"),
        )
    )
    _build_in_wrapper(
        tool,
        go_mod,
        f"k8s.io/kubernetes/cmd/{tool.name}",
        ldflags="-s -w " + stamp,
        workdir_name=f"kubernetes-{v}",
    )


def _build_etcd(tool: Tool) -> None:
    v = tool.version
    go_mod = textwrap.dedent(
        f"""\
        module otterscale.local/etcd-tool

        go 1.26.0

        require go.etcd.io/etcd/server/v3 {v}

        replace (
        \tgo.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 {v}
        \tgo.etcd.io/etcd/client/pkg/v3 => go.etcd.io/etcd/client/pkg/v3 {v}
        \tgo.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 {v}
        \tgo.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 {v}
        )
        """
    )
    _build_in_wrapper(tool, go_mod, "go.etcd.io/etcd/server/v3", ldflags="-s -w")


def _build_module_main(tool: Tool, module: str, package: str) -> None:
    """Build a main package of a published module in a wrapper module.

    A wrapper rather than ``go install pkg@version``: the latter also reads the module's version
    list, which the proxy here refuses for some modules. The wrapper's go.sum is seeded with the
    tool's own go.sum (the tool module itself is verified against the checksum database first),
    so its dependencies are verified against the hashes its authors committed even where the
    checksum database has no entry for them.
    """
    src = cache_root() / "src" / f"{tool.name}-{tool.version}"
    src.mkdir(parents=True, exist_ok=True)
    go_mod = f"module otterscale.local/{tool.name}-tool\n\ngo 1.26.0\n\nrequire {module} {tool.version}\n"
    (src / "go.mod").write_text(go_mod)
    (src / "go.sum").write_text(_module_go_sum(src, module, tool.version))
    _build_in_wrapper(tool, go_mod, package, ldflags="-s -w")


def _module_go_sum(src: Path, module: str, version: str) -> str:
    """The go.sum ``module`` ships at ``version`` (downloaded and verified by ``go mod download``)."""
    info = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        cwd=src,
        env=_go_env(),
        check=True,
        capture_output=True,
        text=True,
    )
    module_dir = Path(json.loads(info.stdout)["Dir"])
    return (module_dir / "go.sum").read_text() if (module_dir / "go.sum").is_file() else ""


#: PID 1 of every Pod sandbox: holds the Pod's namespaces, reaps zombies, exits on SIGINT/SIGTERM.
#: The same job as Kubernetes' own pause (a C program there), which no registry here can provide.
_PAUSE_MAIN = """\
// pause: PID 1 of a Pod sandbox (built by otterscale.testing.tools).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if os.Getpid() != 1 {
		os.Stderr.WriteString("pause: warning: not running as PID 1\\n")
	}
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
"""

#: CoreDNS with only what cluster DNS needs (no forward plugin: no query ever leaves the node, and
#: none of the cloud back-ends, so the download and the build stay small). The directive order is
#: that of CoreDNS' plugin.cfg.
_COREDNS_MAIN = """\
// coredns: cluster DNS for the test node (built by otterscale.testing.tools).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"ready", "health", "errors", "log", "loadbalance", "cache", "kubernetes"}
}

func main() { coremain.Run() }
"""


def _build_pause(tool: Tool) -> None:
    src = cache_root() / "src" / f"{tool.name}-{tool.version}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "main.go").write_text(_PAUSE_MAIN)
    _build_in_wrapper(tool, "module otterscale.local/pause\n\ngo 1.26.0\n", ".", ldflags="-s -w")


def _build_coredns(tool: Tool) -> None:
    """CoreDNS' own main package would pull every plugin in; ours (:data:`_COREDNS_MAIN`) only a few.

    The wrapper's go.sum is seeded with CoreDNS' own, as for :func:`_build_module_main`.
    """
    module = "github.com/coredns/coredns"
    src = cache_root() / "src" / f"{tool.name}-{tool.version}"
    src.mkdir(parents=True, exist_ok=True)
    go_mod = f"module otterscale.local/coredns-tool\n\ngo 1.26.0\n\nrequire {module} {tool.version}\n"
    (src / "go.mod").write_text(go_mod)
    (src / "main.go").write_text(_COREDNS_MAIN)
    (src / "go.sum").write_text(_module_go_sum(src, module, tool.version))
    _build_in_wrapper(tool, go_mod, ".", ldflags="-s -w")


def _maven_url(group: str, artifact: str, version: str, ext: str) -> str:
    return f"{MAVEN_CENTRAL}/{group.replace('.', '/')}/{artifact}/{version}/{artifact}-{version}.{ext}"


def _published_digest(url: str) -> tuple[str, str]:
    """The strongest checksum Maven Central publishes for ``url``: (hashlib name, hex digest)."""
    for algorithm in ("sha512", "sha256", "sha1"):
        try:
            with urllib.request.urlopen(f"{url}.{algorithm}", timeout=60) as resp:  # noqa: S310 - fixed https
                text = resp.read(4096).decode("ascii", errors="replace")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                continue
            raise
        # The file holds the hex digest, sometimes followed by the file name.
        digest = text.split()[0].strip().lower() if text.split() else ""
        if len(digest) == hashlib.new(algorithm).digest_size * 2:
            return algorithm, digest
        raise RuntimeError(f"{url}.{algorithm} does not hold a {algorithm} digest")
    raise RuntimeError(f"Maven Central publishes no sha512, sha256 or sha1 checksum for {url}")


def _download(url: str, dest: Path, algorithm: str, expected: str) -> None:
    """Stream ``url`` into ``dest``, printing progress, and check its digest."""
    digest = hashlib.new(algorithm)
    started = last_report = time.monotonic()
    done = 0
    with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:  # noqa: S310
        total = int(resp.headers.get("Content-Length") or 0)
        while chunk := resp.read(1024 * 1024):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            now = time.monotonic()
            if now - last_report >= 5 or (total and done == total):
                last_report = now
                share = f" ({100 * done / total:.0f}% of {total / 1e6:.0f} MB)" if total else ""
                _log(f"  {done / 1e6:.0f} MB{share}, {done / 1e6 / max(now - started, 1e-3):.1f} MB/s")
    if total and done != total:
        raise RuntimeError(f"{url}: got {done} of {total} bytes")
    if digest.hexdigest() != expected:
        raise RuntimeError(f"{url}: {algorithm} mismatch (got {digest.hexdigest()}, published {expected})")
    _log(f"  {algorithm} verified in {time.monotonic() - started:.0f}s")


def _unzip(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest`` keeping Unix permission bits (``kc.sh`` must stay executable)."""
    root = dest.resolve()
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = (dest / info.filename).resolve()
            if not target.is_relative_to(root):
                raise RuntimeError(f"{archive.name}: entry {info.filename!r} escapes the target folder")
            zf.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                target.chmod(mode)


def _fetch_keycloak(tool: Tool) -> None:
    """Download ``org.keycloak:keycloak-quarkus-dist`` from Maven Central, verify it, unpack it.

    Unpacked into a scratch folder first and renamed into place last, so an interrupted fetch never
    leaves a half-unpacked distribution that looks complete.
    """
    url = _maven_url("org.keycloak", "keycloak-quarkus-dist", tool.version, "zip")
    home = tool.home
    scratch = home.with_name(home.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        algorithm, expected = _published_digest(url)
        _log(f"downloading {url}")
        archive = scratch / "dist.zip"
        _download(url, archive, algorithm, expected)
        unpacked = scratch / "unpacked"
        _unzip(archive, unpacked)
        tops = list(unpacked.iterdir())
        if len(tops) != 1 or not (tops[0] / tool.entry).is_file():
            raise RuntimeError(f"{url}: unexpected layout (no single folder with {tool.entry})")
        shutil.rmtree(home, ignore_errors=True)
        tops[0].rename(home)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_BUILDERS: dict[str, Callable[[Tool], None]] = {
    "chisel": lambda t: _build_module_main(t, "github.com/jpillora/chisel", "github.com/jpillora/chisel"),
    "etcd": _build_etcd,
    "kube-apiserver": _build_kubernetes,
    "kube-controller-manager": _build_kubernetes,
    "kubelet": _build_kubernetes,
    "kube-scheduler": _build_kubernetes,
    "kube-proxy": _build_kubernetes,
    "pause": _build_pause,
    "coredns": _build_coredns,
    "helm": lambda t: _build_module_main(t, "helm.sh/helm/v3", "helm.sh/helm/v3/cmd/helm"),
    "grpcurl": lambda t: _build_module_main(
        t, "github.com/fullstorydev/grpcurl", "github.com/fullstorydev/grpcurl/cmd/grpcurl"
    ),
    "keycloak": _fetch_keycloak,
}


def build(names: list[str], force: bool = False) -> int:
    """Build (or fetch) the named tools that are not cached yet; returns the number of failures."""
    have_go = shutil.which("go") is not None
    failures = 0
    for i, name in enumerate(names, 1):
        tool = TOOLS[name]
        prefix = f"({i}/{len(names)}) {name} {tool.version}"
        if tool.path.is_file() and not force:
            _log(f"{prefix}: cached at {tool.path}")
            continue
        if tool.go and not have_go:
            failures += 1
            _log(f"{prefix}: FAILED: `go` is not on PATH: install Go >= 1.26 first")
            continue
        slow = " (a cold Kubernetes build takes 5-15 minutes on 2 cores)" if name.startswith("kube") else ""
        _log(f"{prefix}: {'building' if tool.go else 'fetching'}{slow}")
        started = time.monotonic()
        try:
            _BUILDERS[name](tool)
        except (subprocess.CalledProcessError, OSError, RuntimeError) as exc:
            failures += 1
            _log(f"{prefix}: FAILED: {exc}")
            continue
        done = "built" if tool.go else "fetched"
        _log(f"{prefix}: {done} in {time.monotonic() - started:.0f}s -> {tool.path}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m otterscale.testing.tools",
        description=(
            "Build pinned chisel, etcd, kube-apiserver, kube-controller-manager, helm and grpcurl "
            "from the Go module proxy, and fetch Keycloak from Maven Central, into a cache outside "
            "the repository "
            f"(now: {cache_root()}; set OTTERSCALE_TOOLS_DIR to move it). Cached tools are skipped."
        ),
    )
    parser.add_argument(
        "tools",
        nargs="*",
        metavar="TOOL",
        help=f"any of {', '.join(TOOLS)}, or `node` for {', '.join(NODE_TOOLS)} "
        f"(default: {', '.join(DEFAULT_TOOLS)})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--print-paths", action="store_true", help="print each tool's path and exit")
    args = parser.parse_args(argv)
    names = list(dict.fromkeys(n for name in args.tools for n in GROUPS.get(name, (name,)))) or list(
        DEFAULT_TOOLS
    )
    unknown = sorted(set(names) - set(TOOLS))
    if unknown:
        parser.error(f"unknown tool(s) {', '.join(unknown)}; choose from {', '.join(TOOLS)}")
    if args.print_paths:
        for name in names:
            t = TOOLS[name]
            print(f"{name}\t{t.version}\t{t.path}\t{'built' if t.path.is_file() else 'missing'}")
        return 0
    started = time.monotonic()
    failures = build(names, force=args.force)
    _log(f"done in {time.monotonic() - started:.0f}s, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
