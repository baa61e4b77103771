from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
    MODEL_STATE_AWAITING_SEAL: _ClassVar[ModelState]

class UvaMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UVA_MODE_UNSPECIFIED: _ClassVar[UvaMode]
    UVA_MODE_HOST_MAPPED: _ClassVar[UvaMode]
    UVA_MODE_REGISTERED: _ClassVar[UvaMode]
    UVA_MODE_PAGEABLE: _ClassVar[UvaMode]
    UVA_MODE_COPY_ON_USE: _ClassVar[UvaMode]

class SegmentKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEGMENT_KIND_UNSPECIFIED: _ClassVar[SegmentKind]
    SEGMENT_KIND_POOL: _ClassVar[SegmentKind]
    SEGMENT_KIND_STATIC: _ClassVar[SegmentKind]

class Placement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_UNSPECIFIED: _ClassVar[Placement]
    PLACEMENT_DEVICE: _ClassVar[Placement]
    PLACEMENT_UVA: _ClassVar[Placement]
    PLACEMENT_PREFETCH: _ClassVar[Placement]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_FAILED: ModelState
MODEL_STATE_AWAITING_SEAL: ModelState
UVA_MODE_UNSPECIFIED: UvaMode
UVA_MODE_HOST_MAPPED: UvaMode
UVA_MODE_REGISTERED: UvaMode
UVA_MODE_PAGEABLE: UvaMode
UVA_MODE_COPY_ON_USE: UvaMode
SEGMENT_KIND_UNSPECIFIED: SegmentKind
SEGMENT_KIND_POOL: SegmentKind
SEGMENT_KIND_STATIC: SegmentKind
PLACEMENT_UNSPECIFIED: Placement
PLACEMENT_DEVICE: Placement
PLACEMENT_UVA: Placement
PLACEMENT_PREFETCH: Placement

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("version", "build", "uptime_ms", "devices", "cuda_absent_reason", "vllm_env", "config", "recovery", "durability", "scrub")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BUILD_FIELD_NUMBER: _ClassVar[int]
    UPTIME_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    CUDA_ABSENT_REASON_FIELD_NUMBER: _ClassVar[int]
    VLLM_ENV_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_FIELD_NUMBER: _ClassVar[int]
    DURABILITY_FIELD_NUMBER: _ClassVar[int]
    SCRUB_FIELD_NUMBER: _ClassVar[int]
    version: str
    build: BuildInfo
    uptime_ms: int
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    cuda_absent_reason: str
    vllm_env: VllmEnv
    config: ConfigSummary
    recovery: Recovery
    durability: Durability
    scrub: Scrub
    def __init__(self, version: _Optional[str] = ..., build: _Optional[_Union[BuildInfo, _Mapping]] = ..., uptime_ms: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., cuda_absent_reason: _Optional[str] = ..., vllm_env: _Optional[_Union[VllmEnv, _Mapping]] = ..., config: _Optional[_Union[ConfigSummary, _Mapping]] = ..., recovery: _Optional[_Union[Recovery, _Mapping]] = ..., durability: _Optional[_Union[Durability, _Mapping]] = ..., scrub: _Optional[_Union[Scrub, _Mapping]] = ...) -> None: ...

class Durability(_message.Message):
    __slots__ = ("journal_required", "journal_write_failures", "last_failure", "not_durable")
    JOURNAL_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    JOURNAL_WRITE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_FIELD_NUMBER: _ClassVar[int]
    NOT_DURABLE_FIELD_NUMBER: _ClassVar[int]
    journal_required: bool
    journal_write_failures: int
    last_failure: str
    not_durable: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, journal_required: _Optional[bool] = ..., journal_write_failures: _Optional[int] = ..., last_failure: _Optional[str] = ..., not_durable: _Optional[_Iterable[str]] = ...) -> None: ...

class Scrub(_message.Message):
    __slots__ = ("bytes_per_second", "bytes_checked", "passes", "out_of_service")
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BYTES_CHECKED_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_SERVICE_FIELD_NUMBER: _ClassVar[int]
    bytes_per_second: int
    bytes_checked: int
    passes: int
    out_of_service: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bytes_per_second: _Optional[int] = ..., bytes_checked: _Optional[int] = ..., passes: _Optional[int] = ..., out_of_service: _Optional[_Iterable[str]] = ...) -> None: ...

class Recovery(_message.Message):
    __slots__ = ("journal", "journal_error", "pools_adopted", "models_adopted", "dropped")
    JOURNAL_FIELD_NUMBER: _ClassVar[int]
    JOURNAL_ERROR_FIELD_NUMBER: _ClassVar[int]
    POOLS_ADOPTED_FIELD_NUMBER: _ClassVar[int]
    MODELS_ADOPTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    journal: str
    journal_error: str
    pools_adopted: _containers.RepeatedScalarFieldContainer[str]
    models_adopted: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedCompositeFieldContainer[RecoveryDrop]
    def __init__(self, journal: _Optional[str] = ..., journal_error: _Optional[str] = ..., pools_adopted: _Optional[_Iterable[str]] = ..., models_adopted: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[_Union[RecoveryDrop, _Mapping]]] = ...) -> None: ...

class RecoveryDrop(_message.Message):
    __slots__ = ("kind", "name", "reason")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    reason: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class BuildInfo(_message.Message):
    __slots__ = ("git_sha", "target", "profile")
    GIT_SHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    git_sha: str
    target: str
    profile: str
    def __init__(self, git_sha: _Optional[str] = ..., target: _Optional[str] = ..., profile: _Optional[str] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("id", "kind", "name", "total_memory_bytes", "numa_node", "capabilities", "pin_decision", "fault", "uva_mode", "staging")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUMA_NODE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    PIN_DECISION_FIELD_NUMBER: _ClassVar[int]
    FAULT_FIELD_NUMBER: _ClassVar[int]
    UVA_MODE_FIELD_NUMBER: _ClassVar[int]
    STAGING_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    name: str
    total_memory_bytes: int
    numa_node: int
    capabilities: DeviceCapabilities
    pin_decision: PinDecision
    fault: str
    uva_mode: UvaMode
    staging: DeviceStaging
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., name: _Optional[str] = ..., total_memory_bytes: _Optional[int] = ..., numa_node: _Optional[int] = ..., capabilities: _Optional[_Union[DeviceCapabilities, _Mapping]] = ..., pin_decision: _Optional[_Union[PinDecision, _Mapping]] = ..., fault: _Optional[str] = ..., uva_mode: _Optional[_Union[UvaMode, str]] = ..., staging: _Optional[_Union[DeviceStaging, _Mapping]] = ...) -> None: ...

class DeviceStaging(_message.Message):
    __slots__ = ("bytes", "allocated", "reason")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    allocated: bool
    reason: str
    def __init__(self, bytes: _Optional[int] = ..., allocated: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class DeviceCapabilities(_message.Message):
    __slots__ = ("pin_available", "pin_unavailable_reason", "coherent", "max_pinnable_bytes", "host_register_supported", "pageable_memory_access", "integrated", "unified_addressing")
    PIN_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    PIN_UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    COHERENT_FIELD_NUMBER: _ClassVar[int]
    MAX_PINNABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_REGISTER_SUPPORTED_FIELD_NUMBER: _ClassVar[int]
    PAGEABLE_MEMORY_ACCESS_FIELD_NUMBER: _ClassVar[int]
    INTEGRATED_FIELD_NUMBER: _ClassVar[int]
    UNIFIED_ADDRESSING_FIELD_NUMBER: _ClassVar[int]
    pin_available: bool
    pin_unavailable_reason: str
    coherent: bool
    max_pinnable_bytes: int
    host_register_supported: bool
    pageable_memory_access: bool
    integrated: bool
    unified_addressing: bool
    def __init__(self, pin_available: _Optional[bool] = ..., pin_unavailable_reason: _Optional[str] = ..., coherent: _Optional[bool] = ..., max_pinnable_bytes: _Optional[int] = ..., host_register_supported: _Optional[bool] = ..., pageable_memory_access: _Optional[bool] = ..., integrated: _Optional[bool] = ..., unified_addressing: _Optional[bool] = ...) -> None: ...

class PinDecision(_message.Message):
    __slots__ = ("pin", "reason")
    PIN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    pin: bool
    reason: str
    def __init__(self, pin: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class CreatePoolRequest(_message.Message):
    __slots__ = ("name", "device", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    device: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., device: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class GetPoolRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListPoolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("pools",)
    POOLS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[Pool]
    def __init__(self, pools: _Optional[_Iterable[_Union[Pool, _Mapping]]] = ...) -> None: ...

class DeletePoolRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Pool(_message.Message):
    __slots__ = ("name", "device", "size_bytes", "used_bytes", "pinned", "pin_reason", "path", "numa_node", "registered_bytes", "adopted", "previously_pinned", "durable", "not_durable_reason", "huge_page_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    PIN_REASON_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    NUMA_NODE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUSLY_PINNED_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    NOT_DURABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    HUGE_PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    device: str
    size_bytes: int
    used_bytes: int
    pinned: bool
    pin_reason: str
    path: str
    numa_node: int
    registered_bytes: int
    adopted: bool
    previously_pinned: bool
    durable: bool
    not_durable_reason: str
    huge_page_bytes: int
    def __init__(self, name: _Optional[str] = ..., device: _Optional[str] = ..., size_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., pinned: _Optional[bool] = ..., pin_reason: _Optional[str] = ..., path: _Optional[str] = ..., numa_node: _Optional[int] = ..., registered_bytes: _Optional[int] = ..., adopted: _Optional[bool] = ..., previously_pinned: _Optional[bool] = ..., durable: _Optional[bool] = ..., not_durable_reason: _Optional[str] = ..., huge_page_bytes: _Optional[int] = ...) -> None: ...

class VllmEnv(_message.Message):
    __slots__ = ("disable_pin_memory", "disable_uva")
    DISABLE_PIN_MEMORY_FIELD_NUMBER: _ClassVar[int]
    DISABLE_UVA_FIELD_NUMBER: _ClassVar[int]
    disable_pin_memory: bool
    disable_uva: bool
    def __init__(self, disable_pin_memory: _Optional[bool] = ..., disable_uva: _Optional[bool] = ...) -> None: ...

class ConfigSummary(_message.Message):
    __slots__ = ("uds_path", "tcp_addr", "pools_dir", "max_host_bytes", "model_roots", "metrics_addr")
    UDS_PATH_FIELD_NUMBER: _ClassVar[int]
    TCP_ADDR_FIELD_NUMBER: _ClassVar[int]
    POOLS_DIR_FIELD_NUMBER: _ClassVar[int]
    MAX_HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ROOTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDR_FIELD_NUMBER: _ClassVar[int]
    uds_path: str
    tcp_addr: str
    pools_dir: str
    max_host_bytes: int
    model_roots: _containers.RepeatedScalarFieldContainer[str]
    metrics_addr: str
    def __init__(self, uds_path: _Optional[str] = ..., tcp_addr: _Optional[str] = ..., pools_dir: _Optional[str] = ..., max_host_bytes: _Optional[int] = ..., model_roots: _Optional[_Iterable[str]] = ..., metrics_addr: _Optional[str] = ...) -> None: ...

class UvaConfig(_message.Message):
    __slots__ = ("cpu_offload_bytes", "params")
    CPU_OFFLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    cpu_offload_bytes: int
    params: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cpu_offload_bytes: _Optional[int] = ..., params: _Optional[_Iterable[str]] = ...) -> None: ...

class PrefetchConfig(_message.Message):
    __slots__ = ("group_size", "num_in_group", "prefetch_step", "params")
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_IN_GROUP_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_STEP_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    group_size: int
    num_in_group: int
    prefetch_step: int
    params: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group_size: _Optional[int] = ..., num_in_group: _Optional[int] = ..., prefetch_step: _Optional[int] = ..., params: _Optional[_Iterable[str]] = ...) -> None: ...

class Backend(_message.Message):
    __slots__ = ("uva", "prefetch")
    UVA_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    uva: UvaConfig
    prefetch: PrefetchConfig
    def __init__(self, uva: _Optional[_Union[UvaConfig, _Mapping]] = ..., prefetch: _Optional[_Union[PrefetchConfig, _Mapping]] = ...) -> None: ...

class RegisterModelRequest(_message.Message):
    __slots__ = ("name", "pool", "path", "wait", "backend")
    NAME_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    name: str
    pool: str
    path: str
    wait: bool
    backend: Backend
    def __init__(self, name: _Optional[str] = ..., pool: _Optional[str] = ..., path: _Optional[str] = ..., wait: _Optional[bool] = ..., backend: _Optional[_Union[Backend, _Mapping]] = ...) -> None: ...

class WatchModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ModelProgress(_message.Message):
    __slots__ = ("state", "loaded_bytes", "bytes", "error")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    state: ModelState
    loaded_bytes: int
    bytes: int
    error: str
    def __init__(self, state: _Optional[_Union[ModelState, str]] = ..., loaded_bytes: _Optional[int] = ..., bytes: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "include_tensors", "page_size", "page_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    include_tensors: bool
    page_size: int
    page_token: str
    def __init__(self, name: _Optional[str] = ..., include_tensors: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class UnregisterModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("name", "pool", "tensors", "backend")
    NAME_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    name: str
    pool: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    backend: Backend
    def __init__(self, name: _Optional[str] = ..., pool: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., backend: _Optional[_Union[Backend, _Mapping]] = ...) -> None: ...

class SealModelRequest(_message.Message):
    __slots__ = ("name", "publish_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    publish_token: str
    def __init__(self, name: _Optional[str] = ..., publish_token: _Optional[str] = ...) -> None: ...

class WriteModelRequest(_message.Message):
    __slots__ = ("name", "publish_token", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    publish_token: str
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., publish_token: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteModelResponse(_message.Message):
    __slots__ = ("bytes_written",)
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    bytes_written: int
    def __init__(self, bytes_written: _Optional[int] = ...) -> None: ...

class SetBackendRequest(_message.Message):
    __slots__ = ("model", "backend")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    model: str
    backend: Backend
    def __init__(self, model: _Optional[str] = ..., backend: _Optional[_Union[Backend, _Mapping]] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "pool", "path", "state", "bytes", "tensor_count", "loaded_bytes", "backend", "attached_workers", "error", "tensors", "adopted", "next_page_token", "load_seconds", "publish_token", "durable", "not_durable_reason", "source_objects")
    NAME_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_WORKERS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    NOT_DURABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    pool: str
    path: str
    state: ModelState
    bytes: int
    tensor_count: int
    loaded_bytes: int
    backend: Backend
    attached_workers: int
    error: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    adopted: bool
    next_page_token: str
    load_seconds: float
    publish_token: str
    durable: bool
    not_durable_reason: str
    source_objects: _containers.RepeatedCompositeFieldContainer[SourceObject]
    def __init__(self, name: _Optional[str] = ..., pool: _Optional[str] = ..., path: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., bytes: _Optional[int] = ..., tensor_count: _Optional[int] = ..., loaded_bytes: _Optional[int] = ..., backend: _Optional[_Union[Backend, _Mapping]] = ..., attached_workers: _Optional[int] = ..., error: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., adopted: _Optional[bool] = ..., next_page_token: _Optional[str] = ..., load_seconds: _Optional[float] = ..., publish_token: _Optional[str] = ..., durable: _Optional[bool] = ..., not_durable_reason: _Optional[str] = ..., source_objects: _Optional[_Iterable[_Union[SourceObject, _Mapping]]] = ...) -> None: ...

class SourceObject(_message.Message):
    __slots__ = ("url", "size", "etag", "last_modified_unix_ms")
    URL_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    LAST_MODIFIED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    url: str
    size: int
    etag: str
    last_modified_unix_ms: int
    def __init__(self, url: _Optional[str] = ..., size: _Optional[int] = ..., etag: _Optional[str] = ..., last_modified_unix_ms: _Optional[int] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "strides", "offset", "length", "layer", "crc32c")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    STRIDES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    strides: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    length: int
    layer: int
    crc32c: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., strides: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., layer: _Optional[int] = ..., crc32c: _Optional[int] = ...) -> None: ...

class AttachWorkerRequest(_message.Message):
    __slots__ = ("model", "worker_name", "ttl_ms", "end_with_fast_path", "page_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    END_WITH_FAST_PATH_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker_name: str
    ttl_ms: int
    end_with_fast_path: bool
    page_size: int
    def __init__(self, model: _Optional[str] = ..., worker_name: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., end_with_fast_path: _Optional[bool] = ..., page_size: _Optional[int] = ...) -> None: ...

class GetLeaseTensorsRequest(_message.Message):
    __slots__ = ("lease_id", "page_size", "page_token")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    page_size: int
    page_token: str
    def __init__(self, lease_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class LeaseTensorPage(_message.Message):
    __slots__ = ("tensors", "next_page_token")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[LeaseTensor]
    next_page_token: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[LeaseTensor, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("path", "size_bytes", "kind", "device", "ipc_handle")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    kind: SegmentKind
    device: str
    ipc_handle: bytes
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., kind: _Optional[_Union[SegmentKind, str]] = ..., device: _Optional[str] = ..., ipc_handle: _Optional[bytes] = ...) -> None: ...

class LeaseTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "strides", "layer", "placement", "segment", "offset", "length", "static_segment", "static_offset", "crc32c")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    STRIDES_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    STATIC_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    STATIC_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    strides: _containers.RepeatedScalarFieldContainer[int]
    layer: int
    placement: Placement
    segment: int
    offset: int
    length: int
    static_segment: int
    static_offset: int
    crc32c: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., strides: _Optional[_Iterable[int]] = ..., layer: _Optional[int] = ..., placement: _Optional[_Union[Placement, str]] = ..., segment: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., static_segment: _Optional[int] = ..., static_offset: _Optional[int] = ..., crc32c: _Optional[int] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "ttl_ms", "pinned", "pin_reason", "backend", "segments", "tensors", "prefetch_next", "offloaded_layers", "prefetch_slots", "uva_mode", "model", "copy_done_events", "next_page_token")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    PIN_REASON_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_NEXT_FIELD_NUMBER: _ClassVar[int]
    OFFLOADED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_SLOTS_FIELD_NUMBER: _ClassVar[int]
    UVA_MODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COPY_DONE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    ttl_ms: int
    pinned: bool
    pin_reason: str
    backend: Backend
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    tensors: _containers.RepeatedCompositeFieldContainer[LeaseTensor]
    prefetch_next: _containers.RepeatedScalarFieldContainer[int]
    offloaded_layers: _containers.RepeatedScalarFieldContainer[int]
    prefetch_slots: int
    uva_mode: UvaMode
    model: str
    copy_done_events: _containers.RepeatedScalarFieldContainer[bytes]
    next_page_token: str
    def __init__(self, lease_id: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., pinned: _Optional[bool] = ..., pin_reason: _Optional[str] = ..., backend: _Optional[_Union[Backend, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[LeaseTensor, _Mapping]]] = ..., prefetch_next: _Optional[_Iterable[int]] = ..., offloaded_layers: _Optional[_Iterable[int]] = ..., prefetch_slots: _Optional[int] = ..., uva_mode: _Optional[_Union[UvaMode, str]] = ..., model: _Optional[str] = ..., copy_done_events: _Optional[_Iterable[bytes]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class KeepAliveResponse(_message.Message):
    __slots__ = ("expires_in_ms", "model_out_of_service")
    EXPIRES_IN_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_OUT_OF_SERVICE_FIELD_NUMBER: _ClassVar[int]
    expires_in_ms: int
    model_out_of_service: str
    def __init__(self, expires_in_ms: _Optional[int] = ..., model_out_of_service: _Optional[str] = ...) -> None: ...

class DetachWorkerRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class DetachWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OnloadToStaticRequest(_message.Message):
    __slots__ = ("lease_id", "layer", "async_copy", "slot_free_event")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ASYNC_COPY_FIELD_NUMBER: _ClassVar[int]
    SLOT_FREE_EVENT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    layer: int
    async_copy: bool
    slot_free_event: bytes
    def __init__(self, lease_id: _Optional[str] = ..., layer: _Optional[int] = ..., async_copy: _Optional[bool] = ..., slot_free_event: _Optional[bytes] = ...) -> None: ...

class OnloadToStaticResponse(_message.Message):
    __slots__ = ("bytes", "slot", "copy_micros")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    COPY_MICROS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    slot: int
    copy_micros: int
    def __init__(self, bytes: _Optional[int] = ..., slot: _Optional[int] = ..., copy_micros: _Optional[int] = ...) -> None: ...
