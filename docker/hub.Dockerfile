# syntax=docker/dockerfile:1.7
# The OtterScale hub image (`otterscale server`).
#
#   docker build -f docker/hub.Dockerfile -t ghcr.io/otterscale/otterscale-hub:0.1.0 .
#   (or `nox -s images`; the build context is the repository root)
#
# Base images are pinned by tag here; pin them by digest (FROM image:tag@sha256:...) in the CI that
# publishes releases, so a rebuild cannot pick up a different base silently.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG GO_IMAGE=golang:1.26-bookworm

# --- chisel, built from the Go module proxy at the pinned version ---------------------------------
FROM ${GO_IMAGE} AS chisel
# Must equal CHISEL_VERSION in packages/testing/src/otterscale/testing/tools.py (the version the
# tests run against); tests/install/test_dockerfiles.py checks it.
ARG CHISEL_VERSION=v1.12.0
ENV CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-trimpath
RUN GOBIN=/out go install -ldflags="-s -w" "github.com/jpillora/chisel@${CHISEL_VERSION}" \
    && test "$(/out/chisel --version)" = "${CHISEL_VERSION#v}"

# --- the Python distributions (the wheels `nox -s build` builds), installed into a venv -----------
FROM ${PYTHON_IMAGE} AS venv
WORKDIR /src
COPY packages/proto/ packages/proto/
COPY packages/common/ packages/common/
COPY packages/hub/ packages/hub/
# Wheels of the in-repo distributions first, then one install that resolves the third-party
# dependencies from the index; the venv has no pip of its own (the base image's pip installs into it).
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels \
        packages/proto packages/common packages/hub \
    && python -m venv --without-pip /opt/otterscale \
    && python -m pip --python /opt/otterscale/bin/python install --no-cache-dir /wheels/*.whl

# --- runtime ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# tini: PID 1 that forwards SIGTERM to the hub (which drains and stops chisel) and reaps zombies.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=chisel /out/chisel /usr/local/bin/chisel
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
