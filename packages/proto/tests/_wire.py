"""A tiny protobuf wire encoder written from the encoding spec, with no protobuf library involved.

The wire-compatibility tests encode the original service's messages with it, field number by
field number, and decode the bytes with the generated classes: a renumbered or retyped field
then fails, whatever the .proto file says.
"""

from __future__ import annotations

import struct
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

VARINT, I64, LEN = 0, 1, 2  # wire types


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64: two's complement, ten bytes
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def f_varint(number: int, value: int) -> bytes:
    """int64, bool and enum fields."""
    return tag(number, VARINT) + varint(value)


def f_bytes(number: int, value: bytes) -> bytes:
    """Length-delimited: bytes, embedded messages."""
    return tag(number, LEN) + varint(len(value)) + value


def f_str(number: int, value: str) -> bytes:
    return f_bytes(number, value.encode())


def f_double(number: int, value: float) -> bytes:
    return tag(number, I64) + struct.pack("<d", value)


# google.protobuf.Struct, by hand: Struct{map<string, Value> fields = 1}; a map entry is a message
# {key = 1, value = 2}; Value is a oneof: null 1, number 2, string 3, bool 4, struct 5, list 6;
# ListValue{repeated Value values = 1}.
def enc_value(value: Any) -> bytes:
    if value is None:
        return f_varint(1, 0)
    if isinstance(value, bool):
        return f_varint(4, int(value))
    if isinstance(value, int | float):
        return f_double(2, float(value))
    if isinstance(value, str):
        return f_str(3, value)
    if isinstance(value, dict):
        return f_bytes(5, enc_struct(value))
    if isinstance(value, list):
        return f_bytes(6, b"".join(f_bytes(1, enc_value(v)) for v in value))
    raise TypeError(value)


def enc_struct(obj: dict[str, Any]) -> bytes:
    return b"".join(f_bytes(1, f_str(1, key) + f_bytes(2, enc_value(val))) for key, val in obj.items())


# --- Descriptor checks shared by the wire-compatibility tests --------------------------------------

#: Field types by the short names the tables use.
TYPES = {
    "string": FieldDescriptor.TYPE_STRING,
    "bool": FieldDescriptor.TYPE_BOOL,
    "int32": FieldDescriptor.TYPE_INT32,
    "int64": FieldDescriptor.TYPE_INT64,
    "uint32": FieldDescriptor.TYPE_UINT32,
    "uint64": FieldDescriptor.TYPE_UINT64,
    "bytes": FieldDescriptor.TYPE_BYTES,
    "message": FieldDescriptor.TYPE_MESSAGE,
    "enum": FieldDescriptor.TYPE_ENUM,
}

#: One field: (name, number, type, repeated, type name of a message/enum field, JSON name).
Row = tuple[str, int, str, bool, str | None, str]


def check_rows(cls: type[Message], package: str, rows: list[Row]) -> None:
    """Assert that each row's field exists in ``cls`` with that number, type, cardinality and JSON name."""
    desc = cls.DESCRIPTOR
    name = desc.name
    assert desc.full_name == f"{package}.{name}"
    for field_name, number, kind, repeated, type_name, json_name in rows:
        field = desc.fields_by_name.get(field_name)
        assert field is not None, f"{name}.{field_name} missing"
        where = f"{name}.{field_name}"
        assert field.number == number, where
        assert field.type == TYPES[kind], where
        assert field.is_repeated == repeated, where
        assert field.json_name == json_name, where
        if kind == "message":
            assert field.message_type.full_name == type_name, where
        if kind == "enum":
            assert field.enum_type.full_name == type_name, where


def populated(cls: type[Message]) -> Message:
    """A message with every scalar and repeated field set to a non-default value."""
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                getattr(msg, field.name).add()
            else:
                getattr(msg, field.name).SetInParent()
        elif field.is_repeated:
            getattr(msg, field.name).append("x")
        elif field.type == FieldDescriptor.TYPE_ENUM:
            setattr(msg, field.name, 1)
        elif field.type == FieldDescriptor.TYPE_BOOL:
            setattr(msg, field.name, True)
        elif field.type in _INTEGERS:
            setattr(msg, field.name, 42)
        elif field.type == FieldDescriptor.TYPE_BYTES:
            setattr(msg, field.name, b"x")
        else:
            setattr(msg, field.name, "x")
    return msg


_INTEGERS = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
    }
)
