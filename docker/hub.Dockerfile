# The OtterScale hub image (`otterscale server`). Needs BuildKit (Docker >= 23, or DOCKER_BUILDKIT=1).
#
#   docker build -f docker/hub.Dockerfile -t ghcr.io/otterscale/otterscale-hub:0.1.0 .
#   (or `nox -s images`; the build context is the repository root)
#
# Build arguments (the defaults pull from Docker Hub):
#   PYTHON_IMAGE  base of the build and runtime stages: a Debian bookworm with python3 3.11 and its
#                 venv module. `nox -s images` makes one with debootstrap where none can be pulled
#                 (with tini in it, so the runtime stage needs no apt).
#   GO_IMAGE      builds chisel from the Go module proxy (only when CHISEL_IMAGE is not given).
#   CHISEL_IMAGE  an image holding a chisel binary at /out/chisel instead (`nox -s images` makes one
#                 from the tools cache where no Go image can be pulled); the Go stage is skipped.
# Build secret `pip-ca` (optional): the CA bundle pip trusts, behind a TLS-intercepting proxy
#   (`--secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt`).
#
# Base images are pinned by tag here; pin them by digest (FROM image:tag@sha256:...) in the CI that
# publishes releases, so a rebuild cannot pick up a different base silently.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG GO_IMAGE=golang:1.26-bookworm
ARG CHISEL_IMAGE=chisel-build

# --- chisel, built from the Go module proxy at the pinned version ---------------------------------
FROM ${GO_IMAGE} AS chisel-build
# Must equal CHISEL_VERSION in packages/testing/src/otterscale/testing/tools.py (the version the
# tests run against); tests/install/test_dockerfiles.py checks it.
ARG CHISEL_VERSION=v1.12.0
ENV CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-trimpath
RUN GOBIN=/out go install -ldflags="-s -w" "github.com/jpillora/chisel@${CHISEL_VERSION}" \
    && test "$(/out/chisel --version)" = "${CHISEL_VERSION#v}"

# --- chisel: the stage above, or the given image (checked in the runtime stage) -------------------
FROM ${CHISEL_IMAGE} AS chisel

# --- the Python distributions (the wheels `nox -s build` builds), installed into a venv -----------
FROM ${PYTHON_IMAGE} AS venv
WORKDIR /src
COPY packages/proto/ packages/proto/
COPY packages/common/ packages/common/
COPY packages/hub/ packages/hub/
# Wheels of the in-repo distributions first, then one install that resolves the third-party
# dependencies from the index. The venv's own pip does both (a Debian python3 has no pip of its
# own) and is removed afterwards: the runtime venv has no installer. pip's download cache is a
# BuildKit cache mount (never in a layer), so a rebuild after a source change downloads nothing.
RUN --mount=type=secret,id=pip-ca \
    --mount=type=cache,target=/var/cache/pip,sharing=locked \
    if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && export PIP_CACHE_DIR=/var/cache/pip \
    && python3 -m venv /opt/otterscale \
    && /opt/otterscale/bin/pip wheel --no-deps --wheel-dir /wheels \
        packages/proto packages/common packages/hub \
    && /opt/otterscale/bin/pip install /wheels/*.whl \
    && /opt/otterscale/bin/pip uninstall --yes pip setuptools

# --- runtime ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG CHISEL_VERSION=v1.12.0
COPY --from=chisel /out/chisel /usr/local/bin/chisel
# tini: PID 1 that forwards SIGTERM to the hub (which drains and stops chisel) and reaps zombies.
# Debian's, from the base image when it has it already, else from apt.
RUN if ! command -v tini >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && test "$(chisel --version)" = "${CHISEL_VERSION#v}"
COPY --from=venv /opt/otterscale /opt/otterscale

# Read-only root filesystem: HOME and TMPDIR (the chisel authfile) point at /tmp, a writable
# emptyDir in the charts; no .pyc is written at run time (pip compiled them at install).
ENV PATH=/opt/otterscale/bin:$PATH \
    OTTERSCALE_CONTAINER=true \
    HOME=/tmp \
    TMPDIR=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

LABEL org.opencontainers.image.title="otterscale-hub" \
      org.opencontainers.image.description="OtterScale hub: one authenticated ConnectRPC API in front of many Kubernetes clusters" \
      org.opencontainers.image.source="https://github.com/otterscale/otterscale" \
      org.opencontainers.image.licenses="Apache-2.0"

# 65532: the conventional "nonroot" uid/gid; no entry in /etc/passwd is needed.
USER 65532:65532
WORKDIR /tmp
# 8299: the API (Connect, gRPC, gRPC-Web, /metrics, health); 8300: the tunnel server (agents).
EXPOSE 8299 8300
ENTRYPOINT ["tini", "--", "otterscale"]
CMD ["server"]
