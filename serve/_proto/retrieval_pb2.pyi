import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchRequest(_message.Message):
    __slots__ = ("image", "k", "max_distance", "rerank_factor")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MAX_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    RERANK_FACTOR_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    k: int
    max_distance: int
    rerank_factor: int
    def __init__(self, image: _Optional[bytes] = ..., k: _Optional[int] = ..., max_distance: _Optional[int] = ..., rerank_factor: _Optional[int] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "distance", "metadata", "score")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    distance: int
    metadata: _containers.ScalarMap[str, str]
    score: float
    def __init__(self, id: _Optional[str] = ..., distance: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., score: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "model_id")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    model_id: str
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., model_id: _Optional[str] = ...) -> None: ...

class SearchBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SearchRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[SearchRequest, _Mapping]]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "status", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    status: str
    message: str
    def __init__(self, code: _Optional[int] = ..., status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class HitList(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("hits", "error")
    HITS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    hits: HitList
    error: ItemError
    def __init__(self, hits: _Optional[_Union[HitList, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class SearchBatchResponse(_message.Message):
    __slots__ = ("results", "model_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    model_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ..., model_id: _Optional[str] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    def __init__(self, image: _Optional[bytes] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("code", "bits", "model_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    code: bytes
    bits: int
    model_id: str
    def __init__(self, code: _Optional[bytes] = ..., bits: _Optional[int] = ..., model_id: _Optional[str] = ...) -> None: ...

class UpsertItem(_message.Message):
    __slots__ = ("id", "image", "code", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: bytes
    code: bytes
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., image: _Optional[bytes] = ..., code: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("count", "gallery_size")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    count: int
    gallery_size: int
    def __init__(self, count: _Optional[int] = ..., gallery_size: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("count", "gallery_size")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    count: int
    gallery_size: int
    def __init__(self, count: _Optional[int] = ..., gallery_size: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("resize", "crop", "mean", "std", "interpolation")
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    resize: int
    crop: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    interpolation: str
    def __init__(self, resize: _Optional[int] = ..., crop: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., interpolation: _Optional[str] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("backbone", "bits", "preprocessing", "method", "dataset")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    bits: int
    preprocessing: Preprocessing
    method: str
    dataset: str
    def __init__(self, backbone: _Optional[str] = ..., bits: _Optional[int] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., method: _Optional[str] = ..., dataset: _Optional[str] = ...) -> None: ...

class GalleryInfo(_message.Message):
    __slots__ = ("id", "kind", "size", "model_id", "wal_records", "wal_bytes", "last_snapshot")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WAL_RECORDS_FIELD_NUMBER: _ClassVar[int]
    WAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    size: int
    model_id: str
    wal_records: int
    wal_bytes: int
    last_snapshot: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., size: _Optional[int] = ..., model_id: _Optional[str] = ..., wal_records: _Optional[int] = ..., wal_bytes: _Optional[int] = ..., last_snapshot: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_k", "max_image_bytes", "max_pixels", "max_batch_items", "max_batch", "max_delay_us", "queue_size", "max_id_length")
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ID_LENGTH_FIELD_NUMBER: _ClassVar[int]
    max_k: int
    max_image_bytes: int
    max_pixels: int
    max_batch_items: int
    max_batch: int
    max_delay_us: int
    queue_size: int
    max_id_length: int
    def __init__(self, max_k: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_pixels: _Optional[int] = ..., max_batch_items: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_delay_us: _Optional[int] = ..., queue_size: _Optional[int] = ..., max_id_length: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "model", "backend", "gallery", "versions", "limits", "standby_model_id", "standby_role")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    STANDBY_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STANDBY_ROLE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model: ModelSummary
    backend: str
    gallery: GalleryInfo
    versions: _containers.ScalarMap[str, str]
    limits: Limits
    standby_model_id: str
    standby_role: str
    def __init__(self, model_id: _Optional[str] = ..., model: _Optional[_Union[ModelSummary, _Mapping]] = ..., backend: _Optional[str] = ..., gallery: _Optional[_Union[GalleryInfo, _Mapping]] = ..., versions: _Optional[_Mapping[str, str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., standby_model_id: _Optional[str] = ..., standby_role: _Optional[str] = ...) -> None: ...

class LoadCandidateRequest(_message.Message):
    __slots__ = ("exp", "gallery")
    EXP_FIELD_NUMBER: _ClassVar[int]
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    exp: str
    gallery: str
    def __init__(self, exp: _Optional[str] = ..., gallery: _Optional[str] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PairsStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListItemsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShadowReport(_message.Message):
    __slots__ = ("compared", "dropped", "failed", "mean_overlap", "mean_rank_correlation", "fraction")
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    MEAN_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    MEAN_RANK_CORRELATION_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    compared: int
    dropped: int
    failed: int
    mean_overlap: float
    mean_rank_correlation: float
    fraction: float
    def __init__(self, compared: _Optional[int] = ..., dropped: _Optional[int] = ..., failed: _Optional[int] = ..., mean_overlap: _Optional[float] = ..., mean_rank_correlation: _Optional[float] = ..., fraction: _Optional[float] = ...) -> None: ...

class PairsStatus(_message.Message):
    __slots__ = ("live_model_id", "live_gallery", "standby_model_id", "standby_gallery", "standby_role", "shadow")
    LIVE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LIVE_GALLERY_FIELD_NUMBER: _ClassVar[int]
    STANDBY_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STANDBY_GALLERY_FIELD_NUMBER: _ClassVar[int]
    STANDBY_ROLE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    live_model_id: str
    live_gallery: str
    standby_model_id: str
    standby_gallery: str
    standby_role: str
    shadow: ShadowReport
    def __init__(self, live_model_id: _Optional[str] = ..., live_gallery: _Optional[str] = ..., standby_model_id: _Optional[str] = ..., standby_gallery: _Optional[str] = ..., standby_role: _Optional[str] = ..., shadow: _Optional[_Union[ShadowReport, _Mapping]] = ...) -> None: ...

class GalleryItem(_message.Message):
    __slots__ = ("id", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
