import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from otterscale.resource.v1 import resource_pb2 as _resource_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClusterSelection(_message.Message):
    __slots__ = ("clusters", "label_selector")
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedScalarFieldContainer[str]
    label_selector: str
    def __init__(self, clusters: _Optional[_Iterable[str]] = ..., label_selector: _Optional[str] = ...) -> None: ...

class ResourceQuery(_message.Message):
    __slots__ = ("group", "version", "resource", "namespace", "label_selector", "field_selector")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    FIELD_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    group: str
    version: str
    resource: str
    namespace: str
    label_selector: str
    field_selector: str
    def __init__(self, group: _Optional[str] = ..., version: _Optional[str] = ..., resource: _Optional[str] = ..., namespace: _Optional[str] = ..., label_selector: _Optional[str] = ..., field_selector: _Optional[str] = ...) -> None: ...

class FanoutOptions(_message.Message):
    __slots__ = ("per_cluster_timeout", "max_concurrency", "require_all")
    PER_CLUSTER_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_ALL_FIELD_NUMBER: _ClassVar[int]
    per_cluster_timeout: _duration_pb2.Duration
    max_concurrency: int
    require_all: bool
    def __init__(self, per_cluster_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_concurrency: _Optional[int] = ..., require_all: _Optional[bool] = ...) -> None: ...

class MultiListRequest(_message.Message):
    __slots__ = ("selection", "query", "limit", "cursor", "order", "options")
    class Order(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ORDER_UNSPECIFIED: _ClassVar[MultiListRequest.Order]
        ORDER_FAIR: _ClassVar[MultiListRequest.Order]
        ORDER_CLUSTER_MAJOR: _ClassVar[MultiListRequest.Order]
    ORDER_UNSPECIFIED: MultiListRequest.Order
    ORDER_FAIR: MultiListRequest.Order
    ORDER_CLUSTER_MAJOR: MultiListRequest.Order
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    selection: ClusterSelection
    query: ResourceQuery
    limit: int
    cursor: str
    order: MultiListRequest.Order
    options: FanoutOptions
    def __init__(self, selection: _Optional[_Union[ClusterSelection, _Mapping]] = ..., query: _Optional[_Union[ResourceQuery, _Mapping]] = ..., limit: _Optional[int] = ..., cursor: _Optional[str] = ..., order: _Optional[_Union[MultiListRequest.Order, str]] = ..., options: _Optional[_Union[FanoutOptions, _Mapping]] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("cluster", "outcome", "message", "retryable", "latency", "items", "code", "final")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_OK: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_FORBIDDEN: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_NOT_SERVED: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_UNAVAILABLE: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_TIMEOUT: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_EXPIRED: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_THROTTLED: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_INVALID: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_UNAUTHENTICATED: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_ERROR: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_NOT_ATTEMPTED: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_UNKNOWN_CLUSTER: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_CONNECTING: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_SYNCED: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_RESYNC_START: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_RESYNC_END: _ClassVar[ClusterStatus.Outcome]
        OUTCOME_REMOVED: _ClassVar[ClusterStatus.Outcome]
    OUTCOME_UNSPECIFIED: ClusterStatus.Outcome
    OUTCOME_OK: ClusterStatus.Outcome
    OUTCOME_FORBIDDEN: ClusterStatus.Outcome
    OUTCOME_NOT_SERVED: ClusterStatus.Outcome
    OUTCOME_UNAVAILABLE: ClusterStatus.Outcome
    OUTCOME_TIMEOUT: ClusterStatus.Outcome
    OUTCOME_EXPIRED: ClusterStatus.Outcome
    OUTCOME_THROTTLED: ClusterStatus.Outcome
    OUTCOME_INVALID: ClusterStatus.Outcome
    OUTCOME_UNAUTHENTICATED: ClusterStatus.Outcome
    OUTCOME_ERROR: ClusterStatus.Outcome
    OUTCOME_NOT_ATTEMPTED: ClusterStatus.Outcome
    OUTCOME_UNKNOWN_CLUSTER: ClusterStatus.Outcome
    OUTCOME_CONNECTING: ClusterStatus.Outcome
    OUTCOME_SYNCED: ClusterStatus.Outcome
    OUTCOME_RESYNC_START: ClusterStatus.Outcome
    OUTCOME_RESYNC_END: ClusterStatus.Outcome
    OUTCOME_REMOVED: ClusterStatus.Outcome
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    outcome: ClusterStatus.Outcome
    message: str
    retryable: bool
    latency: _duration_pb2.Duration
    items: int
    code: str
    final: bool
    def __init__(self, cluster: _Optional[str] = ..., outcome: _Optional[_Union[ClusterStatus.Outcome, str]] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., items: _Optional[int] = ..., code: _Optional[str] = ..., final: _Optional[bool] = ...) -> None: ...

class ClusterList(_message.Message):
    __slots__ = ("cluster", "list")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    list: _resource_pb2.ListResponse
    def __init__(self, cluster: _Optional[str] = ..., list: _Optional[_Union[_resource_pb2.ListResponse, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("clusters_total", "clusters_done", "clusters_failed", "items_returned", "remaining_estimate")
    CLUSTERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_DONE_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_FAILED_FIELD_NUMBER: _ClassVar[int]
    ITEMS_RETURNED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    clusters_total: int
    clusters_done: int
    clusters_failed: int
    items_returned: int
    remaining_estimate: int
    def __init__(self, clusters_total: _Optional[int] = ..., clusters_done: _Optional[int] = ..., clusters_failed: _Optional[int] = ..., items_returned: _Optional[int] = ..., remaining_estimate: _Optional[int] = ...) -> None: ...

class ClusterResourceVersion(_message.Message):
    __slots__ = ("cluster", "resource_version")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    resource_version: str
    def __init__(self, cluster: _Optional[str] = ..., resource_version: _Optional[str] = ...) -> None: ...

class MultiListResponse(_message.Message):
    __slots__ = ("lists", "statuses", "next_cursor", "resume", "progress", "resource_versions")
    LISTS_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    lists: _containers.RepeatedCompositeFieldContainer[ClusterList]
    statuses: _containers.RepeatedCompositeFieldContainer[ClusterStatus]
    next_cursor: str
    resume: str
    progress: Progress
    resource_versions: _containers.RepeatedCompositeFieldContainer[ClusterResourceVersion]
    def __init__(self, lists: _Optional[_Iterable[_Union[ClusterList, _Mapping]]] = ..., statuses: _Optional[_Iterable[_Union[ClusterStatus, _Mapping]]] = ..., next_cursor: _Optional[str] = ..., resume: _Optional[str] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., resource_versions: _Optional[_Iterable[_Union[ClusterResourceVersion, _Mapping]]] = ...) -> None: ...

class MultiWatchRequest(_message.Message):
    __slots__ = ("selection", "query", "resume", "resume_from", "initial_events", "disable_auto_resync", "options", "checkpoint_interval")
    class InitialEvents(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        INITIAL_EVENTS_UNSPECIFIED: _ClassVar[MultiWatchRequest.InitialEvents]
        INITIAL_EVENTS_NONE: _ClassVar[MultiWatchRequest.InitialEvents]
        INITIAL_EVENTS_MISSING_ONLY: _ClassVar[MultiWatchRequest.InitialEvents]
        INITIAL_EVENTS_ALL: _ClassVar[MultiWatchRequest.InitialEvents]
    INITIAL_EVENTS_UNSPECIFIED: MultiWatchRequest.InitialEvents
    INITIAL_EVENTS_NONE: MultiWatchRequest.InitialEvents
    INITIAL_EVENTS_MISSING_ONLY: MultiWatchRequest.InitialEvents
    INITIAL_EVENTS_ALL: MultiWatchRequest.InitialEvents
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    INITIAL_EVENTS_FIELD_NUMBER: _ClassVar[int]
    DISABLE_AUTO_RESYNC_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    selection: ClusterSelection
    query: ResourceQuery
    resume: str
    resume_from: _containers.RepeatedCompositeFieldContainer[ClusterResourceVersion]
    initial_events: MultiWatchRequest.InitialEvents
    disable_auto_resync: bool
    options: FanoutOptions
    checkpoint_interval: _duration_pb2.Duration
    def __init__(self, selection: _Optional[_Union[ClusterSelection, _Mapping]] = ..., query: _Optional[_Union[ResourceQuery, _Mapping]] = ..., resume: _Optional[str] = ..., resume_from: _Optional[_Iterable[_Union[ClusterResourceVersion, _Mapping]]] = ..., initial_events: _Optional[_Union[MultiWatchRequest.InitialEvents, str]] = ..., disable_auto_resync: _Optional[bool] = ..., options: _Optional[_Union[FanoutOptions, _Mapping]] = ..., checkpoint_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ClusterEvent(_message.Message):
    __slots__ = ("cluster", "event")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    event: _resource_pb2.WatchEvent
    def __init__(self, cluster: _Optional[str] = ..., event: _Optional[_Union[_resource_pb2.WatchEvent, _Mapping]] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("resume", "clusters_synced", "clusters_total")
    RESUME_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_SYNCED_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    resume: str
    clusters_synced: int
    clusters_total: int
    def __init__(self, resume: _Optional[str] = ..., clusters_synced: _Optional[int] = ..., clusters_total: _Optional[int] = ...) -> None: ...

class MultiWatchResponse(_message.Message):
    __slots__ = ("event", "status", "checkpoint")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    event: ClusterEvent
    status: ClusterStatus
    checkpoint: Checkpoint
    def __init__(self, event: _Optional[_Union[ClusterEvent, _Mapping]] = ..., status: _Optional[_Union[ClusterStatus, _Mapping]] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ...) -> None: ...
