from loraserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "adapter_id", "text", "token_ids", "messages", "params", "add_special_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    adapter_id: str
    text: str
    token_ids: TokenIds
    messages: ChatMessages
    params: SamplingParams
    add_special_tokens: bool
    def __init__(self, request_id: _Optional[str] = ..., adapter_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., add_special_tokens: _Optional[bool] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages", "add_generation_prompt", "chat_template_kwargs")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ADD_GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_KWARGS_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    add_generation_prompt: bool
    chat_template_kwargs: str
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., add_generation_prompt: _Optional[bool] = ..., chat_template_kwargs: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "logprobs", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    min_p: float
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "adapter_id", "token_ids", "text", "logprobs", "top_logprobs", "finish_reason", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    adapter_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    finish_reason: FinishReason
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., adapter_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class TopLogprobs(_message.Message):
    __slots__ = ("alternatives",)
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    alternatives: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, alternatives: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GetEngineInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetEngineInfoResponse(_message.Message):
    __slots__ = ("config", "model", "memory_plan", "occupancy", "cache_stats")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PLAN_FIELD_NUMBER: _ClassVar[int]
    OCCUPANCY_FIELD_NUMBER: _ClassVar[int]
    CACHE_STATS_FIELD_NUMBER: _ClassVar[int]
    config: EngineConfig
    model: ModelSummary
    memory_plan: MemoryPlan
    occupancy: Occupancy
    cache_stats: CacheStats
    def __init__(self, config: _Optional[_Union[EngineConfig, _Mapping]] = ..., model: _Optional[_Union[ModelSummary, _Mapping]] = ..., memory_plan: _Optional[_Union[MemoryPlan, _Mapping]] = ..., occupancy: _Optional[_Union[Occupancy, _Mapping]] = ..., cache_stats: _Optional[_Union[CacheStats, _Mapping]] = ...) -> None: ...

class EngineConfig(_message.Message):
    __slots__ = ("max_loras", "max_lora_rank", "max_cpu_loras", "lora_dtype", "lora_target_modules", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_cache_bytes", "kv_block_size", "max_queue_len", "dtype", "device", "lora_backend", "allow_pickle_adapters", "attention_backend", "enforce_eager")
    MAX_LORAS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_CPU_LORAS_FIELD_NUMBER: _ClassVar[int]
    LORA_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_LEN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LORA_BACKEND_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PICKLE_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    ENFORCE_EAGER_FIELD_NUMBER: _ClassVar[int]
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    lora_dtype: str
    lora_target_modules: _containers.RepeatedScalarFieldContainer[str]
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    kv_cache_bytes: int
    kv_block_size: int
    max_queue_len: int
    dtype: str
    device: str
    lora_backend: str
    allow_pickle_adapters: bool
    attention_backend: str
    enforce_eager: bool
    def __init__(self, max_loras: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., max_cpu_loras: _Optional[int] = ..., lora_dtype: _Optional[str] = ..., lora_target_modules: _Optional[_Iterable[str]] = ..., max_num_seqs: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., max_model_len: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., max_queue_len: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., lora_backend: _Optional[str] = ..., allow_pickle_adapters: _Optional[bool] = ..., attention_backend: _Optional[str] = ..., enforce_eager: _Optional[bool] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("path", "architecture", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size", "num_parameters", "dtype", "max_model_len", "device")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    path: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    num_parameters: int
    dtype: str
    max_model_len: int
    device: str
    def __init__(self, path: _Optional[str] = ..., architecture: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_heads: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., vocab_size: _Optional[int] = ..., num_parameters: _Optional[int] = ..., dtype: _Optional[str] = ..., max_model_len: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class MemoryPlan(_message.Message):
    __slots__ = ("model_dtype", "lora_dtype", "bytes_per_slot", "slots_bytes", "host_cache_bytes", "weights_bytes", "kv_cache_bytes", "kv_cache_blocks", "kv_cache_tokens", "max_model_len", "device_total_bytes", "warnings", "lora_workspace_bytes", "attention_workspace_bytes")
    MODEL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LORA_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SLOT_FIELD_NUMBER: _ClassVar[int]
    SLOTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    LORA_WORKSPACE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_WORKSPACE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_dtype: str
    lora_dtype: str
    bytes_per_slot: int
    slots_bytes: int
    host_cache_bytes: int
    weights_bytes: int
    kv_cache_bytes: int
    kv_cache_blocks: int
    kv_cache_tokens: int
    max_model_len: int
    device_total_bytes: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    lora_workspace_bytes: int
    attention_workspace_bytes: int
    def __init__(self, model_dtype: _Optional[str] = ..., lora_dtype: _Optional[str] = ..., bytes_per_slot: _Optional[int] = ..., slots_bytes: _Optional[int] = ..., host_cache_bytes: _Optional[int] = ..., weights_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., kv_cache_blocks: _Optional[int] = ..., kv_cache_tokens: _Optional[int] = ..., max_model_len: _Optional[int] = ..., device_total_bytes: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ..., lora_workspace_bytes: _Optional[int] = ..., attention_workspace_bytes: _Optional[int] = ...) -> None: ...

class Occupancy(_message.Message):
    __slots__ = ("slots_used", "slots_total", "host_cache_used", "host_cache_total", "kv_blocks_free", "kv_blocks_total", "running", "waiting", "registered_adapters")
    SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHE_USED_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    slots_used: int
    slots_total: int
    host_cache_used: int
    host_cache_total: int
    kv_blocks_free: int
    kv_blocks_total: int
    running: int
    waiting: int
    registered_adapters: int
    def __init__(self, slots_used: _Optional[int] = ..., slots_total: _Optional[int] = ..., host_cache_used: _Optional[int] = ..., host_cache_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., registered_adapters: _Optional[int] = ...) -> None: ...

class CacheStats(_message.Message):
    __slots__ = ("host_hits", "host_misses", "slot_hits", "slot_misses", "host_evictions", "slot_evictions")
    HOST_HITS_FIELD_NUMBER: _ClassVar[int]
    HOST_MISSES_FIELD_NUMBER: _ClassVar[int]
    SLOT_HITS_FIELD_NUMBER: _ClassVar[int]
    SLOT_MISSES_FIELD_NUMBER: _ClassVar[int]
    HOST_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    SLOT_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    host_hits: int
    host_misses: int
    slot_hits: int
    slot_misses: int
    host_evictions: int
    slot_evictions: int
    def __init__(self, host_hits: _Optional[int] = ..., host_misses: _Optional[int] = ..., slot_hits: _Optional[int] = ..., slot_misses: _Optional[int] = ..., host_evictions: _Optional[int] = ..., slot_evictions: _Optional[int] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "path", "to_slot", "pin", "sha256", "evict")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TO_SLOT_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EVICT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    path: str
    to_slot: bool
    pin: bool
    sha256: str
    evict: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapter_id: _Optional[str] = ..., path: _Optional[str] = ..., to_slot: _Optional[bool] = ..., pin: _Optional[bool] = ..., sha256: _Optional[str] = ..., evict: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.ResidentAdapter
    def __init__(self, adapter: _Optional[_Union[_common_pb2.ResidentAdapter, _Mapping]] = ...) -> None: ...

class EvictAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "unpin")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    UNPIN_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    unpin: bool
    def __init__(self, adapter_id: _Optional[str] = ..., unpin: _Optional[bool] = ...) -> None: ...

class EvictAdapterResponse(_message.Message):
    __slots__ = ("evicted",)
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    evicted: bool
    def __init__(self, evicted: _Optional[bool] = ...) -> None: ...

class ListResidentAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResidentAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[_common_pb2.ResidentAdapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[_common_pb2.ResidentAdapter, _Mapping]]] = ...) -> None: ...
