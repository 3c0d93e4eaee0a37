from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PropagationPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROPAGATION_POLICY_UNSPECIFIED: _ClassVar[PropagationPolicy]
    PROPAGATION_POLICY_ORPHAN: _ClassVar[PropagationPolicy]
    PROPAGATION_POLICY_BACKGROUND: _ClassVar[PropagationPolicy]
    PROPAGATION_POLICY_FOREGROUND: _ClassVar[PropagationPolicy]
PROPAGATION_POLICY_UNSPECIFIED: PropagationPolicy
PROPAGATION_POLICY_ORPHAN: PropagationPolicy
PROPAGATION_POLICY_BACKGROUND: PropagationPolicy
PROPAGATION_POLICY_FOREGROUND: PropagationPolicy

class APIResource(_message.Message):
    __slots__ = ("group", "version", "resource", "kind", "namespaced", "verbs", "short_names")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACED_FIELD_NUMBER: _ClassVar[int]
    VERBS_FIELD_NUMBER: _ClassVar[int]
    SHORT_NAMES_FIELD_NUMBER: _ClassVar[int]
    group: str
    version: str
    resource: str
    kind: str
    namespaced: bool
    verbs: _containers.RepeatedScalarFieldContainer[str]
    short_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group: _Optional[str] = ..., version: _Optional[str] = ..., resource: _Optional[str] = ..., kind: _Optional[str] = ..., namespaced: _Optional[bool] = ..., verbs: _Optional[_Iterable[str]] = ..., short_names: _Optional[_Iterable[str]] = ...) -> None: ...

class DiscoveryRequest(_message.Message):
    __slots__ = ("cluster",)
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    def __init__(self, cluster: _Optional[str] = ...) -> None: ...

class DiscoveryResponse(_message.Message):
    __slots__ = ("api_resources",)
    API_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    api_resources: _containers.RepeatedCompositeFieldContainer[APIResource]
    def __init__(self, api_resources: _Optional[_Iterable[_Union[APIResource, _Mapping]]] = ...) -> None: ...

class SchemaRequest(_message.Message):
    __slots__ = ("cluster", "group", "version", "kind")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    group: str
    version: str
    kind: str
    def __init__(self, cluster: _Optional[str] = ..., group: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("object",)
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    object: _struct_pb2.Struct
    def __init__(self, object: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("cluster", "group", "version", "resource", "namespace", "label_selector", "field_selector", "limit")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    FIELD_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    group: str
    version: str
    resource: str
    namespace: str
    label_selector: str
    field_selector: str
    limit: int
    def __init__(self, cluster: _Optional[str] = ..., group: _Optional[str] = ..., version: _Optional[str] = ..., resource: _Optional[str] = ..., namespace: _Optional[str] = ..., label_selector: _Optional[str] = ..., field_selector: _Optional[str] = ..., limit: _Optional[int] = ..., **kwargs) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("resource_version", "remaining_item_count", "items")
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_FIELD_NUMBER: _ClassVar[int]
    REMAINING_ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    resource_version: str
    remaining_item_count: int
    items: _containers.RepeatedCompositeFieldContainer[Resource]
    def __init__(self, resource_version: _Optional[str] = ..., remaining_item_count: _Optional[int] = ..., items: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., **kwargs) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("cluster", "group", "version", "resource", "namespace", "name")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    group: str
    version: str
    resource: str
    namespace: str
    name: str
    def __init__(self, cluster: _Optional[str] = ..., group: _Optional[str] = ..., version: _Optional[str] = ..., resource: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("cluster", "group", "version", "resource", "namespace", "name", "events_limit")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EVENTS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    group: str
    version: str
    resource: str
    namespace: str
    name: str
    events_limit: int
    def __init__(self, cluster: _Optional[str] = ..., group: _Optional[str] = ..., version: _Optional[str] = ..., resource: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., events_limit: _Optional[int] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("resource", "events", "events_error")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_ERROR_FIELD_NUMBER: _ClassVar[int]
    resource: Resource
    events: _containers.RepeatedCompositeFieldContainer[Resource]
    events_error: str
    def __init__(self, resource: _Optional[_Union[Resource, _Mapping]] = ..., events: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., events_error: _Optional[str] = ...) -> None: ...

class CreateRequest(_message.Message):
    __slots__ = ("cluster", "group", "version", "resource", "namespace", "manifest", "dry_run")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    group: str
    version: str
    resource: str
    namespace: str
    manifest: bytes
    dry_run: bool
    def __init__(self, cluster: _Optional[str] = ..., group: _Optional[str] = ..., version: _Optional[str] = ..., resource: _Optional[str] = ..., namespace: _Optional[str] = ..., manifest: _Optional[bytes] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("cluster", "group", "version", "resource", "namespace", "name", "manifest", "force", "field_manager", "dry_run")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    FIELD_MANAGER_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    group: str
    version: str
    resource: str
    namespace: str
    name: str
    manifest: bytes
    force: bool
    field_manager: str
    dry_run: bool
    def __init__(self, cluster: _Optional[str] = ..., group: _Optional[str] = ..., version: _Optional[str] = ..., resource: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., manifest: _Optional[bytes] = ..., force: _Optional[bool] = ..., field_manager: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("cluster", "group", "version", "resource", "namespace", "name", "grace_period_seconds", "dry_run", "propagation_policy")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    GRACE_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    PROPAGATION_POLICY_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    group: str
    version: str
    resource: str
    namespace: str
    name: str
    grace_period_seconds: int
    dry_run: bool
    propagation_policy: PropagationPolicy
    def __init__(self, cluster: _Optional[str] = ..., group: _Optional[str] = ..., version: _Optional[str] = ..., resource: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., grace_period_seconds: _Optional[int] = ..., dry_run: _Optional[bool] = ..., propagation_policy: _Optional[_Union[PropagationPolicy, str]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("cluster", "group", "version", "resource", "namespace", "label_selector", "field_selector", "resource_version", "send_initial_events")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    FIELD_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEND_INITIAL_EVENTS_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    group: str
    version: str
    resource: str
    namespace: str
    label_selector: str
    field_selector: str
    resource_version: str
    send_initial_events: bool
    def __init__(self, cluster: _Optional[str] = ..., group: _Optional[str] = ..., version: _Optional[str] = ..., resource: _Optional[str] = ..., namespace: _Optional[str] = ..., label_selector: _Optional[str] = ..., field_selector: _Optional[str] = ..., resource_version: _Optional[str] = ..., send_initial_events: _Optional[bool] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("type", "resource", "resource_version", "status")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[WatchEvent.Type]
        TYPE_ADDED: _ClassVar[WatchEvent.Type]
        TYPE_MODIFIED: _ClassVar[WatchEvent.Type]
        TYPE_DELETED: _ClassVar[WatchEvent.Type]
        TYPE_BOOKMARK: _ClassVar[WatchEvent.Type]
        TYPE_ERROR: _ClassVar[WatchEvent.Type]
    TYPE_UNSPECIFIED: WatchEvent.Type
    TYPE_ADDED: WatchEvent.Type
    TYPE_MODIFIED: WatchEvent.Type
    TYPE_DELETED: WatchEvent.Type
    TYPE_BOOKMARK: WatchEvent.Type
    TYPE_ERROR: WatchEvent.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    type: WatchEvent.Type
    resource: Resource
    resource_version: str
    status: _struct_pb2.Struct
    def __init__(self, type: _Optional[_Union[WatchEvent.Type, str]] = ..., resource: _Optional[_Union[Resource, _Mapping]] = ..., resource_version: _Optional[str] = ..., status: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
