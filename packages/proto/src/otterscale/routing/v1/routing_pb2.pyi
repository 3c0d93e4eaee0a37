from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor
ROUTE_FIELD_NUMBER: _ClassVar[int]
route: _descriptor.FieldDescriptor

class Route(_message.Message):
    __slots__ = ("field", "session")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    field: str
    session: str
    def __init__(self, field: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...
