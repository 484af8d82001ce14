"""Cyclone DDS (IDL) types generated at run time from the typestore's message definitions.

ROS 2 maps a message `pkg/msg/Type` to the IDL struct `pkg::msg::dds_::Type_` (rosidl_generator_dds_idl) and sends
it as plain, little-endian XCDR1 ("CDR_LE", encapsulation 00 01 00 00), which is also what rosbag2 records and what
rosbags' `serialize_cdr` writes. The structs generated here are @final (the IDL default, as rosidl's) with the same
field order and field types, so `to_idl(msg).serialize()` gives the bytes rmw_cyclonedds_cpp would put on the wire;
test/ros/test_idl.py checks this byte for byte for every type the node uses.

Field types (ROS 2 -> IDL -> Python binding): bool -> boolean; byte -> octet; char -> uint8 (ROS 2 maps char to
uint8); intN/uintN/float32/float64 as named; string -> string; arrays and sequences element-wise. Unbounded
`uint8[]`/`byte[]`/`char[]` fields (image data) are declared sequence<uint8>/<octet> for type discovery, but their
(de)serializer is swapped for the binding's `bytes` one: same wire format (uint32 length + raw bytes), and a frame
is copied once instead of becoming a million Python ints each way.
Conversions `to_idl`/`from_idl` go between these structs and rosbags message objects, the one message
representation of the rest of the package.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cyclonedds.idl import IdlStruct, make_idl_struct
from cyclonedds.idl import types as T
from cyclonedds.idl._machinery import BytesMachine
from rosbags.typesys.base import Nodetype

from pdlm_ros.errors import ConfigError
from pdlm_ros.ros import messages as M

__all__ = ["idl_type", "to_idl", "from_idl"]

_PRIMITIVES: dict[str, Any] = {
    "bool": bool, "byte": T.byte, "char": T.uint8, "octet": T.byte,
    "int8": T.int8, "int16": T.int16, "int32": T.int32, "int64": T.int64,
    "uint8": T.uint8, "uint16": T.uint16, "uint32": T.uint32, "uint64": T.uint64,
    "float32": T.float32, "float64": T.float64,
}
_NUMPY: dict[str, Any] = {
    "bool": np.bool_, "byte": np.uint8, "char": np.uint8, "octet": np.uint8,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "float32": np.float32, "float64": np.float64,
}
_BYTES = ("uint8", "byte", "char", "octet")
_CLASSES: dict[str, type[IdlStruct]] = {}


def _fields(msgtype: str) -> list[tuple[str, tuple[Any, Any]]]:
    store = M.typestore()
    if msgtype not in store.fielddefs:
        raise ConfigError(f"unknown message type {msgtype!r}; register its definition in pdlm_ros.ros.messages")
    return list(store.fielddefs[msgtype][1])


def _base_type(spec: tuple[str, int]) -> Any:
    name, bound = spec
    if name == "string":
        return T.bounded_str[bound] if bound else str
    if name in _PRIMITIVES:
        return _PRIMITIVES[name]
    raise ConfigError(f"ROS type {name!r} has no Cyclone DDS mapping here")


def _field_type(node: tuple[Any, Any]) -> Any:
    kind, arg = node
    if kind == Nodetype.BASE:
        return _base_type(arg)
    if kind == Nodetype.NAME:
        return idl_type(arg)
    if kind in (Nodetype.ARRAY, Nodetype.SEQUENCE):
        sub, size = arg
        elem = _field_type(sub)
        if kind == Nodetype.ARRAY:
            return T.array[elem, size]
        return T.sequence[elem, size] if size else T.sequence[elem]
    raise ConfigError(f"unsupported field kind {kind!r}")


def _is_byte_sequence(node: tuple[Any, Any]) -> bool:
    kind, arg = node
    return (kind == Nodetype.SEQUENCE and not arg[1] and arg[0][0] == Nodetype.BASE and arg[0][1][0] in _BYTES)


def idl_type(msgtype: str) -> type[IdlStruct]:
    """The IdlStruct of a message type (generated once, then cached); its typename is ROS 2's DDS type name."""
    cls = _CLASSES.get(msgtype)
    if cls is None:
        fields = {name: _field_type(node) for name, node in _fields(msgtype)}
        cls = make_idl_struct(msgtype.replace("/", "__"), M.dds_type_name(msgtype), fields)
        raw = [name for name, node in _fields(msgtype) if _is_byte_sequence(node)]
        if raw:
            cls.__idl__.populate()
            for machine in (cls.__idl__.v1_machine, cls.__idl__.v2_machine):
                members = getattr(machine, "members_machines", None)
                if members is None:  # the binding changed its layout: fail loudly, not with slow or wrong data
                    raise ConfigError(f"cannot install the bytes codec for {msgtype}: unexpected cyclonedds "
                                      f"machine {type(machine).__name__}")
                for name in raw:
                    members[name] = BytesMachine()
        _CLASSES[msgtype] = cls
    return cls


def _to(node: tuple[Any, Any], value: Any) -> Any:
    kind, arg = node
    if kind == Nodetype.BASE:
        name = arg[0]
        if name == "string":
            return str(value)
        if name == "bool":
            return bool(value)
        return float(value) if name.startswith("float") else int(value)
    if kind == Nodetype.NAME:
        return to_idl(value, arg)
    sub, size = arg
    if sub[0] == Nodetype.BASE and sub[1][0] != "string":
        arr = np.asarray(value, dtype=_NUMPY[sub[1][0]])
        if _is_byte_sequence(node):
            return arr.tobytes()
        if kind == Nodetype.ARRAY and sub[1][0] in _BYTES:
            return bytearray(arr.tobytes())  # fixed byte arrays: the binding's array<uint8> codec takes bytes
        return arr.tolist()
    return [_to(sub, v) for v in value]


def _from(node: tuple[Any, Any], value: Any) -> Any:
    kind, arg = node
    if kind == Nodetype.BASE:
        return value
    if kind == Nodetype.NAME:
        return from_idl(value, arg)
    sub, _ = arg
    if sub[0] == Nodetype.BASE and sub[1][0] != "string":
        dtype = _NUMPY[sub[1][0]]
        if isinstance(value, (bytes, bytearray)):
            return np.frombuffer(value, dtype=np.uint8).astype(dtype, copy=False)
        return np.asarray(value, dtype=dtype)
    return [_from(sub, v) for v in value]


def to_idl(msg: Any, msgtype: str | None = None) -> IdlStruct:
    """A rosbags message object -> the IdlStruct of its type."""
    msgtype = msgtype or msg.__msgtype__
    return idl_type(msgtype)(**{name: _to(node, getattr(msg, name)) for name, node in _fields(msgtype)})


def from_idl(sample: Any, msgtype: str) -> Any:
    """An IdlStruct sample -> the rosbags message object of `msgtype`."""
    cls = M.typestore().types[msgtype]
    return cls(**{name: _from(node, getattr(sample, name)) for name, node in _fields(msgtype)})
