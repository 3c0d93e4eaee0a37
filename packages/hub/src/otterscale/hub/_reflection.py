"""gRPC server reflection (v1 and v1alpha) with the official ``connectrpc-grpcreflect``.

connectrpc-grpcreflect works on Buf's protobuf-py descriptors while the generated code uses
Google's protobuf; the bridge is the descriptor itself: each served file (and its imports) is
serialised from Google's pool and rebuilt as a protobuf-py registry, so reflection describes
exactly the compiled files, comments and all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from connectrpc.interceptor import Interceptor
from connectrpc_grpcreflect import (  # type: ignore[import-untyped]
    ServerReflectionAlphaASGIApplication,
    ServerReflectionAlphaService,
    ServerReflectionASGIApplication,
    ServerReflectionService,
)
from google.protobuf import descriptor_pb2  # type: ignore[import-untyped]  # no stubs for protobuf 7
from google.protobuf.descriptor import (  # type: ignore[import-untyped]  # no stubs for protobuf 7
    FileDescriptor,
    ServiceDescriptor,
)
from protobuf import DescService
from protobuf.wkt import FileDescriptorProto, FileDescriptorSet

logger = logging.getLogger(__name__)


def _ordered_files(roots: Iterable[FileDescriptor]) -> list[FileDescriptor]:
    """The files and their imports, each after everything it imports."""
    ordered: list[FileDescriptor] = []
    seen: set[str] = set()

    def visit(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            visit(dependency)
        ordered.append(file)

    for root in roots:
        visit(root)
    return ordered


def reflection_services(services: Iterable[ServiceDescriptor]) -> list[DescService]:
    """protobuf-py descriptors of ``services`` (Google protobuf descriptors)."""
    services = list(services)
    files = []
    for file in _ordered_files(service.file for service in services):
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        files.append(FileDescriptorProto.from_binary(proto.SerializeToString()))
    registry = FileDescriptorSet(file=files).to_registry()
    found: list[DescService] = []
    for service in services:
        desc = registry.service(service.full_name)
        if desc is None:  # pragma: no cover - the file was just added
            raise LookupError(f"service {service.full_name} missing from its own file")
        found.append(desc)
    return found


def reflection_apps(
    services: Iterable[ServiceDescriptor], *, interceptors: tuple[Interceptor, ...] = ()
) -> list[ServerReflectionASGIApplication | ServerReflectionAlphaASGIApplication]:
    """ASGI applications for ``grpc.reflection.v1`` and ``v1alpha`` describing ``services``."""
    descs = reflection_services(services)
    return [
        ServerReflectionASGIApplication(ServerReflectionService(*descs), interceptors=interceptors),
        ServerReflectionAlphaASGIApplication(ServerReflectionAlphaService(*descs), interceptors=interceptors),
    ]
