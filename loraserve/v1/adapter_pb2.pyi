from loraserve.v1 import common_pb2 as _common_pb2
from loraserve.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATE_UNSPECIFIED: _ClassVar[AdapterState]
    ADAPTER_STATE_REGISTERED: _ClassVar[AdapterState]
    ADAPTER_STATE_LOADING: _ClassVar[AdapterState]
    ADAPTER_STATE_CACHED: _ClassVar[AdapterState]
    ADAPTER_STATE_ACTIVE: _ClassVar[AdapterState]
    ADAPTER_STATE_FAILED: _ClassVar[AdapterState]

class ReplicaStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATUS_UNSPECIFIED: _ClassVar[ReplicaStatus]
    REPLICA_STATUS_UP: _ClassVar[ReplicaStatus]
    REPLICA_STATUS_DOWN: _ClassVar[ReplicaStatus]

class ResidencyChangeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESIDENCY_CHANGE_KIND_UNSPECIFIED: _ClassVar[ResidencyChangeKind]
    RESIDENCY_CHANGE_KIND_LOADED: _ClassVar[ResidencyChangeKind]
    RESIDENCY_CHANGE_KIND_ACTIVATED: _ClassVar[ResidencyChangeKind]
    RESIDENCY_CHANGE_KIND_DEACTIVATED: _ClassVar[ResidencyChangeKind]
    RESIDENCY_CHANGE_KIND_EVICTED: _ClassVar[ResidencyChangeKind]
    RESIDENCY_CHANGE_KIND_LOAD_FAILED: _ClassVar[ResidencyChangeKind]
ADAPTER_STATE_UNSPECIFIED: AdapterState
ADAPTER_STATE_REGISTERED: AdapterState
ADAPTER_STATE_LOADING: AdapterState
ADAPTER_STATE_CACHED: AdapterState
ADAPTER_STATE_ACTIVE: AdapterState
ADAPTER_STATE_FAILED: AdapterState
REPLICA_STATUS_UNSPECIFIED: ReplicaStatus
REPLICA_STATUS_UP: ReplicaStatus
REPLICA_STATUS_DOWN: ReplicaStatus
RESIDENCY_CHANGE_KIND_UNSPECIFIED: ResidencyChangeKind
RESIDENCY_CHANGE_KIND_LOADED: ResidencyChangeKind
RESIDENCY_CHANGE_KIND_ACTIVATED: ResidencyChangeKind
RESIDENCY_CHANGE_KIND_DEACTIVATED: ResidencyChangeKind
RESIDENCY_CHANGE_KIND_EVICTED: ResidencyChangeKind
RESIDENCY_CHANGE_KIND_LOAD_FAILED: ResidencyChangeKind

class RegisteredAdapter(_message.Message):
    __slots__ = ("adapter_id", "source", "sha256", "rank", "lora_alpha", "use_rslora", "target_modules", "size_bytes", "tenant", "metadata", "state", "reason", "pinned", "created_at_ms", "updated_at_ms", "placements")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    source: str
    sha256: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    size_bytes: int
    tenant: str
    metadata: _containers.ScalarMap[str, str]
    state: AdapterState
    reason: str
    pinned: bool
    created_at_ms: int
    updated_at_ms: int
    placements: _containers.RepeatedCompositeFieldContainer[AdapterPlacement]
    def __init__(self, adapter_id: _Optional[str] = ..., source: _Optional[str] = ..., sha256: _Optional[str] = ..., rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., use_rslora: _Optional[bool] = ..., target_modules: _Optional[_Iterable[str]] = ..., size_bytes: _Optional[int] = ..., tenant: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., state: _Optional[_Union[AdapterState, str]] = ..., reason: _Optional[str] = ..., pinned: _Optional[bool] = ..., created_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ..., placements: _Optional[_Iterable[_Union[AdapterPlacement, _Mapping]]] = ...) -> None: ...

class AdapterPlacement(_message.Message):
    __slots__ = ("replica_id", "state")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    state: AdapterState
    def __init__(self, replica_id: _Optional[str] = ..., state: _Optional[_Union[AdapterState, str]] = ...) -> None: ...

class RegisterAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "path", "tenant", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    path: str
    tenant: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, adapter_id: _Optional[str] = ..., path: _Optional[str] = ..., tenant: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class UploadAdapterRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("adapter_id", "adapter_config_json", "tenant", "metadata", "sha256")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    adapter_config_json: bytes
    tenant: str
    metadata: _containers.ScalarMap[str, str]
    sha256: str
    def __init__(self, adapter_id: _Optional[str] = ..., adapter_config_json: _Optional[bytes] = ..., tenant: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., sha256: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "tenant", "state", "replica_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    tenant: str
    state: AdapterState
    replica_id: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., tenant: _Optional[str] = ..., state: _Optional[_Union[AdapterState, str]] = ..., replica_id: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[RegisteredAdapter]
    next_page_token: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[RegisteredAdapter, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UnregisterAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "force")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    force: bool
    def __init__(self, adapter_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class UnregisterAdapterResponse(_message.Message):
    __slots__ = ("evicted_from",)
    EVICTED_FROM_FIELD_NUMBER: _ClassVar[int]
    evicted_from: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, evicted_from: _Optional[_Iterable[str]] = ...) -> None: ...

class ClusterLoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "replica_id", "to_slot")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    TO_SLOT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    replica_id: str
    to_slot: bool
    def __init__(self, adapter_id: _Optional[str] = ..., replica_id: _Optional[str] = ..., to_slot: _Optional[bool] = ...) -> None: ...

class ClusterLoadAdapterResponse(_message.Message):
    __slots__ = ("replica_id", "adapter")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    adapter: _common_pb2.ResidentAdapter
    def __init__(self, replica_id: _Optional[str] = ..., adapter: _Optional[_Union[_common_pb2.ResidentAdapter, _Mapping]] = ...) -> None: ...

class ClusterEvictAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "replica_id", "force")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    replica_id: str
    force: bool
    def __init__(self, adapter_id: _Optional[str] = ..., replica_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class ClusterEvictAdapterResponse(_message.Message):
    __slots__ = ("evicted_from",)
    EVICTED_FROM_FIELD_NUMBER: _ClassVar[int]
    evicted_from: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, evicted_from: _Optional[_Iterable[str]] = ...) -> None: ...

class PinAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class PinAdapterResponse(_message.Message):
    __slots__ = ("replica_ids",)
    REPLICA_IDS_FIELD_NUMBER: _ClassVar[int]
    replica_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, replica_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class UnpinAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class UnpinAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClusterStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicaState(_message.Message):
    __slots__ = ("replica_id", "address", "status", "epoch", "joined_at_ms", "last_heartbeat_ms", "engine", "adapters", "loading", "down_reason")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    JOINED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    DOWN_REASON_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    address: str
    status: ReplicaStatus
    epoch: int
    joined_at_ms: int
    last_heartbeat_ms: int
    engine: _inference_pb2.EngineConfig
    adapters: _containers.RepeatedCompositeFieldContainer[_common_pb2.ResidentAdapter]
    loading: _containers.RepeatedScalarFieldContainer[str]
    down_reason: str
    def __init__(self, replica_id: _Optional[str] = ..., address: _Optional[str] = ..., status: _Optional[_Union[ReplicaStatus, str]] = ..., epoch: _Optional[int] = ..., joined_at_ms: _Optional[int] = ..., last_heartbeat_ms: _Optional[int] = ..., engine: _Optional[_Union[_inference_pb2.EngineConfig, _Mapping]] = ..., adapters: _Optional[_Iterable[_Union[_common_pb2.ResidentAdapter, _Mapping]]] = ..., loading: _Optional[_Iterable[str]] = ..., down_reason: _Optional[str] = ...) -> None: ...

class ClusterState(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaState]
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaState, _Mapping]]] = ...) -> None: ...

class AliasVariant(_message.Message):
    __slots__ = ("adapter_id", "weight")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    weight: float
    def __init__(self, adapter_id: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class Alias(_message.Message):
    __slots__ = ("name", "variants")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    variants: _containers.RepeatedCompositeFieldContainer[AliasVariant]
    def __init__(self, name: _Optional[str] = ..., variants: _Optional[_Iterable[_Union[AliasVariant, _Mapping]]] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("alias",)
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    alias: Alias
    def __init__(self, alias: _Optional[_Union[Alias, _Mapping]] = ...) -> None: ...

class GetAliasRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteAliasRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteAliasResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoutingRule(_message.Message):
    __slots__ = ("name", "match_tenant", "match_headers", "match_adapter_id", "target")
    class MatchHeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MATCH_TENANT_FIELD_NUMBER: _ClassVar[int]
    MATCH_HEADERS_FIELD_NUMBER: _ClassVar[int]
    MATCH_ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    match_tenant: str
    match_headers: _containers.ScalarMap[str, str]
    match_adapter_id: str
    target: str
    def __init__(self, name: _Optional[str] = ..., match_tenant: _Optional[str] = ..., match_headers: _Optional[_Mapping[str, str]] = ..., match_adapter_id: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class RoutingRules(_message.Message):
    __slots__ = ("rules",)
    RULES_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[RoutingRule]
    def __init__(self, rules: _Optional[_Iterable[_Union[RoutingRule, _Mapping]]] = ...) -> None: ...

class SetRoutingRulesRequest(_message.Message):
    __slots__ = ("rules",)
    RULES_FIELD_NUMBER: _ClassVar[int]
    rules: RoutingRules
    def __init__(self, rules: _Optional[_Union[RoutingRules, _Mapping]] = ...) -> None: ...

class GetRoutingRulesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRoutingTableRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoutingTable(_message.Message):
    __slots__ = ("version", "aliases", "rules")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    version: int
    aliases: _containers.RepeatedCompositeFieldContainer[Alias]
    rules: _containers.RepeatedCompositeFieldContainer[RoutingRule]
    def __init__(self, version: _Optional[int] = ..., aliases: _Optional[_Iterable[_Union[Alias, _Mapping]]] = ..., rules: _Optional[_Iterable[_Union[RoutingRule, _Mapping]]] = ...) -> None: ...

class ResolveAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "request_key", "tenant", "headers")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    request_key: str
    tenant: str
    headers: _containers.ScalarMap[str, str]
    def __init__(self, adapter_id: _Optional[str] = ..., request_key: _Optional[str] = ..., tenant: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ResolveAdapterResponse(_message.Message):
    __slots__ = ("adapter_id", "alias", "rule")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    alias: str
    rule: str
    def __init__(self, adapter_id: _Optional[str] = ..., alias: _Optional[str] = ..., rule: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("after_id", "adapter_id", "replica_id")
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    after_id: str
    adapter_id: str
    replica_id: str
    def __init__(self, after_id: _Optional[str] = ..., adapter_id: _Optional[str] = ..., replica_id: _Optional[str] = ...) -> None: ...

class AdapterEvent(_message.Message):
    __slots__ = ("id", "type", "adapter_id", "replica_id", "detail", "at_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: str
    adapter_id: str
    replica_id: str
    detail: str
    at_ms: int
    def __init__(self, id: _Optional[str] = ..., type: _Optional[str] = ..., adapter_id: _Optional[str] = ..., replica_id: _Optional[str] = ..., detail: _Optional[str] = ..., at_ms: _Optional[int] = ...) -> None: ...

class JoinReplicaRequest(_message.Message):
    __slots__ = ("replica_id", "address", "engine", "model_config_json", "snapshot", "snapshot_seq", "manager_credential")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_SEQ_FIELD_NUMBER: _ClassVar[int]
    MANAGER_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    address: str
    engine: _inference_pb2.EngineConfig
    model_config_json: str
    snapshot: _containers.RepeatedCompositeFieldContainer[_common_pb2.ResidentAdapter]
    snapshot_seq: int
    manager_credential: str
    def __init__(self, replica_id: _Optional[str] = ..., address: _Optional[str] = ..., engine: _Optional[_Union[_inference_pb2.EngineConfig, _Mapping]] = ..., model_config_json: _Optional[str] = ..., snapshot: _Optional[_Iterable[_Union[_common_pb2.ResidentAdapter, _Mapping]]] = ..., snapshot_seq: _Optional[int] = ..., manager_credential: _Optional[str] = ...) -> None: ...

class JoinReplicaResponse(_message.Message):
    __slots__ = ("epoch", "heartbeat_interval_ms", "drop", "routing_version")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    ROUTING_VERSION_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    heartbeat_interval_ms: int
    drop: _containers.RepeatedScalarFieldContainer[str]
    routing_version: int
    def __init__(self, epoch: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., drop: _Optional[_Iterable[str]] = ..., routing_version: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("replica_id", "epoch", "snapshot", "snapshot_seq", "load")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    epoch: int
    snapshot: _containers.RepeatedCompositeFieldContainer[_common_pb2.ResidentAdapter]
    snapshot_seq: int
    load: ReplicaLoad
    def __init__(self, replica_id: _Optional[str] = ..., epoch: _Optional[int] = ..., snapshot: _Optional[_Iterable[_Union[_common_pb2.ResidentAdapter, _Mapping]]] = ..., snapshot_seq: _Optional[int] = ..., load: _Optional[_Union[ReplicaLoad, _Mapping]] = ...) -> None: ...

class ReplicaLoad(_message.Message):
    __slots__ = ("waiting", "running", "kv_free_fraction", "draining")
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_FREE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    waiting: int
    running: int
    kv_free_fraction: float
    draining: bool
    def __init__(self, waiting: _Optional[int] = ..., running: _Optional[int] = ..., kv_free_fraction: _Optional[float] = ..., draining: _Optional[bool] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("rejoin", "routing_version", "unpin", "pin", "drop")
    REJOIN_FIELD_NUMBER: _ClassVar[int]
    ROUTING_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNPIN_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    rejoin: bool
    routing_version: int
    unpin: _containers.RepeatedScalarFieldContainer[str]
    pin: _containers.RepeatedScalarFieldContainer[str]
    drop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rejoin: _Optional[bool] = ..., routing_version: _Optional[int] = ..., unpin: _Optional[_Iterable[str]] = ..., pin: _Optional[_Iterable[str]] = ..., drop: _Optional[_Iterable[str]] = ...) -> None: ...

class ResidencyChange(_message.Message):
    __slots__ = ("seq", "kind", "adapter_id", "slot", "at_ms", "reason")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: ResidencyChangeKind
    adapter_id: str
    slot: int
    at_ms: int
    reason: str
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[_Union[ResidencyChangeKind, str]] = ..., adapter_id: _Optional[str] = ..., slot: _Optional[int] = ..., at_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportResidencyRequest(_message.Message):
    __slots__ = ("replica_id", "epoch", "changes")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    epoch: int
    changes: _containers.RepeatedCompositeFieldContainer[ResidencyChange]
    def __init__(self, replica_id: _Optional[str] = ..., epoch: _Optional[int] = ..., changes: _Optional[_Iterable[_Union[ResidencyChange, _Mapping]]] = ...) -> None: ...

class ReportResidencyResponse(_message.Message):
    __slots__ = ("rejoin",)
    REJOIN_FIELD_NUMBER: _ClassVar[int]
    rejoin: bool
    def __init__(self, rejoin: _Optional[bool] = ...) -> None: ...

class LeaveReplicaRequest(_message.Message):
    __slots__ = ("replica_id", "epoch")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    epoch: int
    def __init__(self, replica_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class LeaveReplicaResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AcquireAdapterRequest(_message.Message):
    __slots__ = ("replica_id", "epoch", "adapter_id", "snapshot")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    epoch: int
    adapter_id: str
    snapshot: _containers.RepeatedCompositeFieldContainer[_common_pb2.ResidentAdapter]
    def __init__(self, replica_id: _Optional[str] = ..., epoch: _Optional[int] = ..., adapter_id: _Optional[str] = ..., snapshot: _Optional[_Iterable[_Union[_common_pb2.ResidentAdapter, _Mapping]]] = ...) -> None: ...

class AcquireAdapterResponse(_message.Message):
    __slots__ = ("adapter_id", "sha256", "size_bytes", "resident", "evict")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    EVICT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    sha256: str
    size_bytes: int
    resident: bool
    evict: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapter_id: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., resident: _Optional[bool] = ..., evict: _Optional[_Iterable[str]] = ...) -> None: ...

class FetchAdapterWeightsRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class AdapterWeightsChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: WeightsHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[WeightsHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class WeightsHeader(_message.Message):
    __slots__ = ("adapter_id", "sha256", "size_bytes", "adapter_config_json")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    sha256: str
    size_bytes: int
    adapter_config_json: bytes
    def __init__(self, adapter_id: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., adapter_config_json: _Optional[bytes] = ...) -> None: ...
