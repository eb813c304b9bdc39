import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_TIER_UNSPECIFIED: _ClassVar[AdapterTier]
    ADAPTER_TIER_HOST: _ClassVar[AdapterTier]
    ADAPTER_TIER_SLOT: _ClassVar[AdapterTier]
ADAPTER_TIER_UNSPECIFIED: AdapterTier
ADAPTER_TIER_HOST: AdapterTier
ADAPTER_TIER_SLOT: AdapterTier

class ResidentAdapter(_message.Message):
    __slots__ = ("adapter_id", "tier", "slot", "pinned", "last_used", "in_flight", "rank", "size_bytes", "sha256")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    tier: AdapterTier
    slot: int
    pinned: bool
    last_used: _timestamp_pb2.Timestamp
    in_flight: int
    rank: int
    size_bytes: int
    sha256: str
    def __init__(self, adapter_id: _Optional[str] = ..., tier: _Optional[_Union[AdapterTier, str]] = ..., slot: _Optional[int] = ..., pinned: _Optional[bool] = ..., last_used: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., in_flight: _Optional[int] = ..., rank: _Optional[int] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...
