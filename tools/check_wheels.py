"""Check the built distributions: one wheel and one sdist per package, each at its own pyproject
version, and each wheel installing alone into a fresh virtualenv and importing.

    python tools/check_wheels.py --dist dist packages/proto packages/common packages/hub packages/agent

For each wheel: a new venv (uv when available, else `python -m venv` + pip) gets the wheel, the
in-repo distributions it declares (transitively, taken from dist/, never from an index) and the
third-party packages it declares (from the package index); then every module the wheel ships is
imported, and every entry point it declares is loaded, with the repository kept off `sys.path`.
Only the standard library is used, so this runs under any Python >= 3.11.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

# Runs inside the fresh venv: import every module, load every entry point, report failures.
IMPORT_CHECK = """
import importlib, importlib.metadata, sys, traceback
dist, modules = sys.argv[1], sys.argv[2:]
failed = 0
for name in modules:
    try:
        importlib.import_module(name)
    except BaseException:
        failed += 1
        print(f"  import {name} failed:\\n" + traceback.format_exc(), file=sys.stderr)
eps = list(importlib.metadata.distribution(dist).entry_points)
for ep in eps:
    try:
        ep.load()
    except BaseException:
        failed += 1
        print(f"  entry point {ep.name} = {ep.value} failed:\\n" + traceback.format_exc(), file=sys.stderr)
print(f"{len(modules)} modules, {len(eps)} entry points")
sys.exit(1 if failed else 0)
"""


def normalize(name: str) -> str:
    """PEP 503 name normalization."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Dist:
    name: str  # normalized project name
    version: str
    wheel: Path
    requires: list[str]  # normalized names of unconditional Requires-Dist entries
    modules: list[str]  # dotted names of the modules the wheel ships


def read_wheel(path: Path) -> Dist:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = HeaderParser().parsestr(zf.read(metadata_name).decode())
    requires = []
    for req in metadata.get_all("Requires-Dist") or []:
        if ";" in req and "extra" in req.split(";", 1)[1]:
            continue  # optional extras are not part of a plain install
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        if match:
            requires.append(normalize(match.group(1)))
    modules = sorted(
        n.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for n in names
        if n.endswith(".py") and ".dist-info/" not in n and not n.endswith("__main__.py")
    )
    return Dist(normalize(metadata["Name"]), metadata["Version"], path, requires, modules)


def closure(dist: Dist, in_repo: dict[str, Dist]) -> list[Dist]:
    """`dist` and the in-repo distributions it depends on, transitively."""
    seen: dict[str, Dist] = {}
    todo = [dist]
    while todo:
        current = todo.pop()
        if current.name not in seen:
            seen[current.name] = current
            todo += [in_repo[name] for name in current.requires if name in in_repo]
    return list(seen.values())


# Variables that would point uv, pip or Python at another environment than the fresh one.
FOREIGN_ENV = (
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "UV_PYTHON",
    "UV_PROJECT_ENVIRONMENT",
    "PYTHONPATH",
    "PYTHONHOME",
)


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def check_wheel(dist: Dist, in_repo: dict[str, Dist], dist_dir: Path) -> tuple[bool, str]:
    """Install `dist` into a fresh venv with its declared dependencies only, then import it."""
    if not dist.modules:
        return False, "the wheel ships no Python module"
    wheels = [str(d.wheel) for d in closure(dist, in_repo)]
    with tempfile.TemporaryDirectory(prefix=f"wheel-{dist.name}-") as tmp:
        venv = Path(tmp) / "venv"
        python = venv / "bin" / "python"
        uv = shutil.which("uv")
        if uv:
            steps = [
                [uv, "venv", "--quiet", "--python", sys.executable, str(venv)],
                [
                    uv,
                    "pip",
                    "install",
                    "--quiet",
                    "--python",
                    str(python),
                    "--find-links",
                    str(dist_dir),
                    *wheels,
                ],
            ]
        else:
            steps = [
                [sys.executable, "-m", "venv", str(venv)],
                [str(python), "-m", "pip", "install", "--quiet", "--find-links", str(dist_dir), *wheels],
            ]
        for step in steps:
            result = run(step, cwd=Path(tmp))
            if result.returncode != 0:
                return False, f"`{' '.join(step[:3])} ...` failed:\n{result.stdout}{result.stderr}"
        # -I: isolated mode, so neither the current directory nor PYTHONPATH can shadow the wheel.
        result = run([str(python), "-I", "-c", IMPORT_CHECK, dist.name, *dist.modules], cwd=Path(tmp))
        if result.returncode != 0:
            return False, (result.stdout + result.stderr).strip()
        return True, result.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, default=Path("dist"), help="the built wheels and sdists")
    parser.add_argument("packages", type=Path, nargs="+", help="package folders (with a pyproject.toml)")
    args = parser.parse_args(argv)
    dist_dir: Path = args.dist.resolve()

    expected = {}
    for folder in args.packages:
        project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
        if "version" not in project:
            print(f"FAIL {folder}: no static version in pyproject.toml (each package versions itself)")
            return 1
        expected[normalize(project["name"])] = project["version"]

    ok = True
    wheels = {}
    for path in sorted(dist_dir.glob("*.whl")):
        wheel = read_wheel(path)
        if expected.get(wheel.name) != wheel.version:
            ok = False
            print(f"FAIL {path.name}: not a wheel of the listed packages at their pyproject versions")
        wheels[wheel.name] = wheel
    for name, version in sorted(expected.items()):
        sdist = dist_dir / f"{name.replace('-', '_')}-{version}.tar.gz"
        if name not in wheels or not sdist.exists():
            ok = False
            print(f"FAIL {name} {version}: wheel or sdist missing in {dist_dir} (run `nox -s build`)")
    print("versions: " + ", ".join(f"{name} {version}" for name, version in sorted(expected.items())))

    for name in expected:  # dependency order, as given on the command line
        if name not in wheels:
            continue
        wheel = wheels[name]
        passed, detail = check_wheel(wheel, wheels, dist_dir)
        ok &= passed
        if passed:
            print(f"PASS {wheel.wheel.name}: installs alone and imports ({detail})")
        else:
            print(f"FAIL {wheel.wheel.name}:\n  " + detail.replace("\n", "\n  "))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
