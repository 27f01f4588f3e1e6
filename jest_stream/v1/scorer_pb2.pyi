from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DT_INVALID: _ClassVar[DataType]
    DT_FLOAT16: _ClassVar[DataType]
    DT_FLOAT32: _ClassVar[DataType]
    DT_FLOAT64: _ClassVar[DataType]
    DT_INT32: _ClassVar[DataType]
    DT_INT64: _ClassVar[DataType]
    DT_UINT8: _ClassVar[DataType]
    DT_BOOL: _ClassVar[DataType]
    DT_BFLOAT16: _ClassVar[DataType]
DT_INVALID: DataType
DT_FLOAT16: DataType
DT_FLOAT32: DataType
DT_FLOAT64: DataType
DT_INT32: DataType
DT_INT64: DataType
DT_UINT8: DataType
DT_BOOL: DataType
DT_BFLOAT16: DataType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LearnerScores(_message.Message):
    __slots__ = ("losses", "image_embeds", "text_embeds", "logit_scale", "logit_bias")
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    losses: Tensor
    image_embeds: Tensor
    text_embeds: Tensor
    logit_scale: float
    logit_bias: float
    def __init__(self, losses: _Optional[_Union[Tensor, _Mapping]] = ..., image_embeds: _Optional[_Union[Tensor, _Mapping]] = ..., text_embeds: _Optional[_Union[Tensor, _Mapping]] = ..., logit_scale: _Optional[float] = ..., logit_bias: _Optional[float] = ...) -> None: ...

class SelectRequest(_message.Message):
    __slots__ = ("model", "job_id", "keys", "inputs", "learner", "n_select", "score", "sampler", "n_chunks", "score_gain", "seed", "dataset", "softmax_score", "lookahead")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    LEARNER_FIELD_NUMBER: _ClassVar[int]
    N_SELECT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    N_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SCORE_GAIN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SOFTMAX_SCORE_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    model: str
    job_id: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    inputs: _containers.MessageMap[str, Tensor]
    learner: LearnerScores
    n_select: int
    score: str
    sampler: str
    n_chunks: int
    score_gain: float
    seed: int
    dataset: str
    softmax_score: str
    lookahead: str
    def __init__(self, model: _Optional[str] = ..., job_id: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., inputs: _Optional[_Mapping[str, Tensor]] = ..., learner: _Optional[_Union[LearnerScores, _Mapping]] = ..., n_select: _Optional[int] = ..., score: _Optional[str] = ..., sampler: _Optional[str] = ..., n_chunks: _Optional[int] = ..., score_gain: _Optional[float] = ..., seed: _Optional[int] = ..., dataset: _Optional[str] = ..., softmax_score: _Optional[str] = ..., lookahead: _Optional[str] = ...) -> None: ...

class SelectResponse(_message.Message):
    __slots__ = ("indices", "mean_score", "mean_score_all", "cache_hits", "cache_misses", "model_version", "mean_learner_loss", "mean_reference_loss", "reference_above_learner", "nonfinite_reference")
    INDICES_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_ALL_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEAN_LEARNER_LOSS_FIELD_NUMBER: _ClassVar[int]
    MEAN_REFERENCE_LOSS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ABOVE_LEARNER_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    mean_score: float
    mean_score_all: float
    cache_hits: int
    cache_misses: int
    model_version: str
    mean_learner_loss: float
    mean_reference_loss: float
    reference_above_learner: float
    nonfinite_reference: int
    def __init__(self, indices: _Optional[_Iterable[int]] = ..., mean_score: _Optional[float] = ..., mean_score_all: _Optional[float] = ..., cache_hits: _Optional[int] = ..., cache_misses: _Optional[int] = ..., model_version: _Optional[str] = ..., mean_learner_loss: _Optional[float] = ..., mean_reference_loss: _Optional[float] = ..., reference_above_learner: _Optional[float] = ..., nonfinite_reference: _Optional[int] = ...) -> None: ...

class ReferenceRequest(_message.Message):
    __slots__ = ("model", "job_id", "keys", "inputs", "return_outputs", "dataset")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    model: str
    job_id: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    inputs: _containers.MessageMap[str, Tensor]
    return_outputs: bool
    dataset: str
    def __init__(self, model: _Optional[str] = ..., job_id: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., inputs: _Optional[_Mapping[str, Tensor]] = ..., return_outputs: bool = ..., dataset: _Optional[str] = ...) -> None: ...

class ReferenceResponse(_message.Message):
    __slots__ = ("outputs", "cache_hits", "cache_misses", "model_version", "nonfinite_reference")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, Tensor]
    cache_hits: int
    cache_misses: int
    model_version: str
    nonfinite_reference: int
    def __init__(self, outputs: _Optional[_Mapping[str, Tensor]] = ..., cache_hits: _Optional[int] = ..., cache_misses: _Optional[int] = ..., model_version: _Optional[str] = ..., nonfinite_reference: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "inputs", "outputs", "version", "logit_scale", "logit_bias", "cached_entries")
    class CachedEntriesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    CACHED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    version: str
    logit_scale: float
    logit_bias: float
    cached_entries: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., version: _Optional[str] = ..., logit_scale: _Optional[float] = ..., logit_bias: _Optional[float] = ..., cached_entries: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
