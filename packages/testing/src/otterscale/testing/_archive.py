"""Single-binary container images as ``docker save`` archives, made without Docker or a registry.

The test node's pause and CoreDNS images are one static Go binary each (from the tools cache).
containerd imports the archive format ``docker save`` writes (``manifest.json``, the image config,
one ``layer.tar`` per layer), so the node needs neither a Docker engine nor a registry for them.
Archives are deterministic: the same binary gives the same image id.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path


def _layer(binary: Path, target: str) -> bytes:
    """An uncompressed layer holding ``binary`` at ``target`` (root-owned, mode 0755, mtime 0)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tar:
        content = binary.read_bytes()
        info = tarfile.TarInfo(target.lstrip("/"))
        info.size, info.mode, info.mtime = len(content), 0o755, 0
        tar.addfile(info, io.BytesIO(content))
    return data.getvalue()


def write_binary_image(
    archive: Path, ref: str, binary: Path, *, target: str, args: Sequence[str] = (), user: str = "65532:65532"
) -> str:
    """Write an image whose entrypoint is ``binary`` (at ``target``) to ``archive``; returns its id."""
    layer = _layer(binary, target)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {"Entrypoint": [target], "Cmd": list(args) or None, "User": user, "Env": ["PATH=/"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [
                {"created": "1970-01-01T00:00:00Z", "created_by": f"otterscale.testing: {binary.name}"}
            ],
        },
        sort_keys=True,
    ).encode()
    image_id = hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        [{"Config": f"{image_id}.json", "RepoTags": [ref], "Layers": [f"{diff_id[7:]}/layer.tar"]}]
    ).encode()
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in (
            (f"{diff_id[7:]}/layer.tar", layer),
            (f"{image_id}.json", config),
            ("manifest.json", manifest),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            tar.addfile(info, io.BytesIO(content))
    partial.replace(archive)
    return "sha256:" + image_id
