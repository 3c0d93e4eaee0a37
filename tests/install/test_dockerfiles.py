"""Static checks of the Dockerfiles (no Docker needed): the pinned chisel is the one the tests use,
base images are pinned, and each image is the non-root, container-mode service it claims to be.
hadolint (`nox -s hadolint`) checks the rest."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from otterscale.testing.tools import CHISEL_VERSION

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {
    "hub": {"command": "server", "ports": {"8299", "8300"}},
    "agent": {"command": "agent", "ports": {"8299"}},
}


def _dockerfile(name: str) -> str:
    return (ROOT / "docker" / f"{name}.Dockerfile").read_text()


def _args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))


@pytest.mark.parametrize("name", IMAGES)
def test_chisel_is_the_version_the_tests_use(name: str) -> None:
    args = _args(_dockerfile(name))
    assert args["CHISEL_VERSION"] == CHISEL_VERSION, (
        f"docker/{name}.Dockerfile builds chisel {args['CHISEL_VERSION']}, the tests use {CHISEL_VERSION} "
        "(packages/testing/src/otterscale/testing/tools.py): change both together"
    )
    assert 'go install -ldflags="-s -w" "github.com/jpillora/chisel@${CHISEL_VERSION}"' in _dockerfile(name)


@pytest.mark.parametrize("name", IMAGES)
def test_base_images_are_pinned_by_tag(name: str) -> None:
    text = _dockerfile(name)
    args = _args(text)
    for ref in (args["PYTHON_IMAGE"], args["GO_IMAGE"]):
        _image, _, tag = ref.partition(":")
        assert tag, ref
        assert tag != "latest", ref
    assert args["PYTHON_IMAGE"].startswith("python:3.11-"), "the runtime Python is the project's (3.11)"
    for line in re.findall(r"^FROM (\S+)", text, re.MULTILINE):
        assert line.startswith("${"), f"FROM {line}: use the pinned ARG"


@pytest.mark.parametrize("name", IMAGES)
def test_runtime_is_non_root_container_mode_with_an_init(name: str) -> None:
    text = _dockerfile(name)
    runtime = text.split("\nFROM ${PYTHON_IMAGE}\n", 1)[1]  # the last, unnamed stage
    assert "USER 65532:65532" in runtime
    assert "OTTERSCALE_CONTAINER=true" in runtime
    assert "HOME=/tmp" in runtime
    assert "TMPDIR=/tmp" in runtime
    assert 'ENTRYPOINT ["tini", "--", "otterscale"]' in runtime
    assert f'CMD ["{IMAGES[name]["command"]}"]' in runtime
    exposed = set(re.search(r"^EXPOSE (.+)$", runtime, re.MULTILINE).group(1).split())  # type: ignore[union-attr]
    assert exposed == IMAGES[name]["ports"]
    assert "COPY --from=chisel /out/chisel /usr/local/bin/chisel" in runtime


@pytest.mark.parametrize("name", IMAGES)
def test_image_installs_exactly_the_in_repo_distributions_it_needs(name: str) -> None:
    """The packages copied into the build are the service and its in-repo dependencies."""
    text = _dockerfile(name)
    copied = set(re.findall(r"^COPY packages/(\w+)/ packages/\1/$", text, re.MULTILINE))
    needed, todo = set(), [name]
    while todo:
        package = todo.pop()
        needed.add(package)
        deps = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())["project"][
            "dependencies"
        ]
        todo += [m.group(1) for d in deps if (m := re.match(r"otterscale-(\w+)", d))]
    assert copied == needed
    ignore = (ROOT / "docker" / f"{name}.Dockerfile.dockerignore").read_text()
    assert {f"!packages/{p}/" for p in needed} <= set(ignore.split())


@pytest.mark.parametrize("name", IMAGES)
def test_builds_from_local_bases_without_a_registry(name: str) -> None:
    """`nox -s images` on a machine that can pull nothing passes a debootstrap Python base and an
    image holding the tools cache's chisel: the Dockerfile must need nothing else from a registry."""
    text = _dockerfile(name)
    assert not re.search(r"^# *syntax=", text, re.MULTILINE), "a syntax directive pulls its frontend image"
    args = _args(text)
    assert args["CHISEL_IMAGE"] == "chisel-build"  # default: the Go stage, as before
    assert "FROM ${GO_IMAGE} AS chisel-build" in text
    assert "FROM ${CHISEL_IMAGE} AS chisel" in text
    runtime = text.split("\nFROM ${PYTHON_IMAGE}\n", 1)[1]
    # tini from apt only when the base lacks it; the copied chisel is the pinned version either way.
    assert "if ! command -v tini >/dev/null; then" in runtime
    assert 'test "$(chisel --version)" = "${CHISEL_VERSION#v}"' in runtime
    # pip's CA bundle is a build secret (never a layer), optional.
    assert "RUN --mount=type=secret,id=pip-ca" in text
    assert "python3 -m venv /opt/otterscale" in text
