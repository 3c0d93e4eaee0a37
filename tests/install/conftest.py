"""Fixtures of the install tests: the freshly built wheels, and fresh virtualenvs made from them.

The wheels come from ``$OTTERSCALE_DIST``, which ``nox -s install`` sets after building them from
this checkout. Without it, the tests that need wheels are skipped with the command that runs them
(``nox -s tests`` runs before anything is built, and stale wheels would test stale code).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

import pytest

# Variables that would point uv, pip or Python at another environment than the fresh one.
_FOREIGN_ENV = (
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "UV_PYTHON",
    "UV_PROJECT_ENVIRONMENT",
    "PYTHONPATH",
    "PYTHONHOME",
)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Venv:
    """A fresh virtualenv with some distributions installed from the built wheels."""

    path: Path

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    def env(self, *, extra_path: tuple[Path, ...] = ()) -> dict[str, str]:
        """A clean environment whose PATH holds only this venv (and ``extra_path``) plus the system."""
        env = {
            k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV and not k.startswith("OTTERSCALE_")
        }
        env["PATH"] = os.pathsep.join([str(self.bin), *map(str, extra_path), "/usr/bin", "/bin"])
        return env

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.path,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="session")
def dist() -> Path:
    value = os.environ.get("OTTERSCALE_DIST")
    if not value:
        pytest.skip(
            "install tests need wheels built from this checkout: run `nox -s install` (it builds them)"
        )
    path = Path(value)
    if not any(path.glob("*.whl")):
        pytest.fail(f"OTTERSCALE_DIST={path} holds no wheel; run `nox -s install`", pytrace=False)
    return path


def _requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = HeaderParser().parsestr(zf.read(name).decode())
    names = []
    for req in metadata.get_all("Requires-Dist") or []:
        if ";" in req and "extra" in req.split(";", 1)[1]:
            continue
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        if match:
            names.append(_normalize(match.group(1)))
    return names


def _in_repo_closure(dist: Path, name: str) -> list[Path]:
    """The wheel of ``name`` and of every in-repo distribution it needs, from ``dist``."""
    wheels = {_normalize(p.name.split("-")[0]): p for p in dist.glob("*.whl")}
    todo, seen = [_normalize(name)], {}
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        if current not in wheels:
            pytest.fail(f"no wheel of {current} in {dist}", pytrace=False)
        seen[current] = wheels[current]
        todo += [req for req in _requires(wheels[current]) if req in wheels]
    return list(seen.values())


@pytest.fixture(scope="session")
def make_venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Venv]]:
    """``make_venv("otterscale-hub")``: a fresh venv with that distribution installed, the way a user
    would (`pip install otterscale-hub`), except that the in-repo wheels come from ``dist`` (they are
    not on an index yet) and the third-party ones from the package index."""
    made: dict[str, Venv] = {}

    def make(name: str) -> Venv:
        if name in made:
            return made[name]
        venv = Venv(tmp_path_factory.mktemp(f"venv-{name}") / "venv")
        python = venv.bin / "python"
        wheels = [str(p) for p in _in_repo_closure(dist, name)]
        uv = shutil.which("uv")
        if uv:
            steps = [
                [uv, "venv", "--quiet", "--python", sys.executable, str(venv.path)],
                [
                    uv,
                    "pip",
                    "install",
                    "--quiet",
                    "--python",
                    str(python),
                    "--find-links",
                    str(dist),
                    *wheels,
                ],
            ]
        else:
            steps = [
                [sys.executable, "-m", "venv", str(venv.path)],
                [str(python), "-m", "pip", "install", "--quiet", "--find-links", str(dist), *wheels],
            ]
        clean = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, env=clean, timeout=600, check=False)
            assert result.returncode == 0, f"{' '.join(step[:3])} failed:\n{result.stdout}{result.stderr}"
        made[name] = venv
        return venv

    return make
