from otterscale.routing.v1 import routing_pb2 as _routing_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Origin(_message.Message):
    __slots__ = ("cluster", "subject")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    subject: str
    def __init__(self, cluster: _Optional[str] = ..., subject: _Optional[str] = ...) -> None: ...

class SayRequest(_message.Message):
    __slots__ = ("cluster", "text")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    text: str
    def __init__(self, cluster: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class SayResponse(_message.Message):
    __slots__ = ("text", "origin", "session_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    origin: Origin
    session_id: str
    def __init__(self, text: _Optional[str] = ..., origin: _Optional[_Union[Origin, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class CountRequest(_message.Message):
    __slots__ = ("cluster", "count", "hold")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    count: int
    hold: bool
    def __init__(self, cluster: _Optional[str] = ..., count: _Optional[int] = ..., hold: _Optional[bool] = ...) -> None: ...

class CountResponse(_message.Message):
    __slots__ = ("index", "origin")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    index: int
    origin: Origin
    def __init__(self, index: _Optional[int] = ..., origin: _Optional[_Union[Origin, _Mapping]] = ...) -> None: ...

class Start(_message.Message):
    __slots__ = ("cluster",)
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    def __init__(self, cluster: _Optional[str] = ...) -> None: ...

class CollectRequest(_message.Message):
    __slots__ = ("start", "text")
    START_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    start: Start
    text: str
    def __init__(self, start: _Optional[_Union[Start, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class CollectResponse(_message.Message):
    __slots__ = ("texts", "origin")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    origin: Origin
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., origin: _Optional[_Union[Origin, _Mapping]] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("start", "text")
    START_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    start: Start
    text: str
    def __init__(self, start: _Optional[_Union[Start, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("text", "origin")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    text: str
    origin: Origin
    def __init__(self, text: _Optional[str] = ..., origin: _Optional[_Union[Origin, _Mapping]] = ...) -> None: ...

class WriteRequest(_message.Message):
    __slots__ = ("session_id", "text")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class WriteResponse(_message.Message):
    __slots__ = ("text", "origin")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    text: str
    origin: Origin
    def __init__(self, text: _Optional[str] = ..., origin: _Optional[_Union[Origin, _Mapping]] = ...) -> None: ...
