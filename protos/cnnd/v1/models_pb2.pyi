from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Conv2d(_message.Message):
    __slots__ = ("out_channels", "kernel_size", "stride", "padding", "bias", "in_channels")
    OUT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    IN_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    out_channels: int
    kernel_size: _containers.RepeatedScalarFieldContainer[int]
    stride: _containers.RepeatedScalarFieldContainer[int]
    padding: _containers.RepeatedScalarFieldContainer[int]
    bias: bool
    in_channels: int
    def __init__(self, out_channels: _Optional[int] = ..., kernel_size: _Optional[_Iterable[int]] = ..., stride: _Optional[_Iterable[int]] = ..., padding: _Optional[_Iterable[int]] = ..., bias: bool = ..., in_channels: _Optional[int] = ...) -> None: ...

class MaxPool2d(_message.Message):
    __slots__ = ("kernel_size", "stride", "padding")
    KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    kernel_size: _containers.RepeatedScalarFieldContainer[int]
    stride: _containers.RepeatedScalarFieldContainer[int]
    padding: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kernel_size: _Optional[_Iterable[int]] = ..., stride: _Optional[_Iterable[int]] = ..., padding: _Optional[_Iterable[int]] = ...) -> None: ...

class AvgPool2d(_message.Message):
    __slots__ = ("kernel_size", "stride", "padding")
    KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    kernel_size: _containers.RepeatedScalarFieldContainer[int]
    stride: _containers.RepeatedScalarFieldContainer[int]
    padding: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kernel_size: _Optional[_Iterable[int]] = ..., stride: _Optional[_Iterable[int]] = ..., padding: _Optional[_Iterable[int]] = ...) -> None: ...

class Linear(_message.Message):
    __slots__ = ("out_features", "bias", "in_features")
    OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    out_features: int
    bias: bool
    in_features: int
    def __init__(self, out_features: _Optional[int] = ..., bias: bool = ..., in_features: _Optional[int] = ...) -> None: ...

class ReLU(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeakyReLU(_message.Message):
    __slots__ = ("negative_slope",)
    NEGATIVE_SLOPE_FIELD_NUMBER: _ClassVar[int]
    negative_slope: float
    def __init__(self, negative_slope: _Optional[float] = ...) -> None: ...

class Tanh(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Sigmoid(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Flatten(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Dropout(_message.Message):
    __slots__ = ("p",)
    P_FIELD_NUMBER: _ClassVar[int]
    p: float
    def __init__(self, p: _Optional[float] = ...) -> None: ...

class BatchNorm2d(_message.Message):
    __slots__ = ("eps", "momentum", "affine", "num_features")
    EPS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    AFFINE_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    eps: float
    momentum: float
    affine: bool
    num_features: int
    def __init__(self, eps: _Optional[float] = ..., momentum: _Optional[float] = ..., affine: bool = ..., num_features: _Optional[int] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("conv2d", "maxpool2d", "avgpool2d", "linear", "relu", "leaky_relu", "tanh", "sigmoid", "flatten", "dropout", "batchnorm2d")
    CONV2D_FIELD_NUMBER: _ClassVar[int]
    MAXPOOL2D_FIELD_NUMBER: _ClassVar[int]
    AVGPOOL2D_FIELD_NUMBER: _ClassVar[int]
    LINEAR_FIELD_NUMBER: _ClassVar[int]
    RELU_FIELD_NUMBER: _ClassVar[int]
    LEAKY_RELU_FIELD_NUMBER: _ClassVar[int]
    TANH_FIELD_NUMBER: _ClassVar[int]
    SIGMOID_FIELD_NUMBER: _ClassVar[int]
    FLATTEN_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    BATCHNORM2D_FIELD_NUMBER: _ClassVar[int]
    conv2d: Conv2d
    maxpool2d: MaxPool2d
    avgpool2d: AvgPool2d
    linear: Linear
    relu: ReLU
    leaky_relu: LeakyReLU
    tanh: Tanh
    sigmoid: Sigmoid
    flatten: Flatten
    dropout: Dropout
    batchnorm2d: BatchNorm2d
    def __init__(self, conv2d: _Optional[_Union[Conv2d, _Mapping]] = ..., maxpool2d: _Optional[_Union[MaxPool2d, _Mapping]] = ..., avgpool2d: _Optional[_Union[AvgPool2d, _Mapping]] = ..., linear: _Optional[_Union[Linear, _Mapping]] = ..., relu: _Optional[_Union[ReLU, _Mapping]] = ..., leaky_relu: _Optional[_Union[LeakyReLU, _Mapping]] = ..., tanh: _Optional[_Union[Tanh, _Mapping]] = ..., sigmoid: _Optional[_Union[Sigmoid, _Mapping]] = ..., flatten: _Optional[_Union[Flatten, _Mapping]] = ..., dropout: _Optional[_Union[Dropout, _Mapping]] = ..., batchnorm2d: _Optional[_Union[BatchNorm2d, _Mapping]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("input_shape", "layers")
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    def __init__(self, input_shape: _Optional[_Iterable[int]] = ..., layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ...) -> None: ...

class EpochMetrics(_message.Message):
    __slots__ = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    learning_rate: float
    seconds: float
    def __init__(self, epoch: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., val_loss: _Optional[float] = ..., val_accuracy: _Optional[float] = ..., learning_rate: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "create_time", "job_id", "history", "source")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    version: int
    create_time: _timestamp_pb2.Timestamp
    job_id: str
    history: _containers.RepeatedCompositeFieldContainer[EpochMetrics]
    source: str
    def __init__(self, version: _Optional[int] = ..., create_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., job_id: _Optional[str] = ..., history: _Optional[_Iterable[_Union[EpochMetrics, _Mapping]]] = ..., source: _Optional[str] = ...) -> None: ...

class BatchingPolicy(_message.Message):
    __slots__ = ("max_batch_size", "max_queue_delay_us", "disabled")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue_delay_us: int
    disabled: bool
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue_delay_us: _Optional[int] = ..., disabled: bool = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("id", "name", "spec", "parameter_count", "versions", "latest_version", "seed", "create_time", "output_shape", "macs", "batching")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MACS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    spec: ModelSpec
    parameter_count: int
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    latest_version: int
    seed: int
    create_time: _timestamp_pb2.Timestamp
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    macs: int
    batching: BatchingPolicy
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., parameter_count: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., latest_version: _Optional[int] = ..., seed: _Optional[int] = ..., create_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., output_shape: _Optional[_Iterable[int]] = ..., macs: _Optional[int] = ..., batching: _Optional[_Union[BatchingPolicy, _Mapping]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("name", "spec", "seed", "batching")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: ModelSpec
    seed: int
    batching: BatchingPolicy
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., seed: _Optional[int] = ..., batching: _Optional[_Union[BatchingPolicy, _Mapping]] = ...) -> None: ...

class CreateModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateModelRequest(_message.Message):
    __slots__ = ("model_id", "batching", "update_mask")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    batching: BatchingPolicy
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, model_id: _Optional[str] = ..., batching: _Optional[_Union[BatchingPolicy, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class UpdateModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportModelRequest(_message.Message):
    __slots__ = ("model_id", "version")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ExportModelResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    def __init__(self, chunk: _Optional[bytes] = ...) -> None: ...

class ImportModelHeader(_message.Message):
    __slots__ = ("name", "size_bytes", "batching")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    batching: BatchingPolicy
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., batching: _Optional[_Union[BatchingPolicy, _Mapping]] = ...) -> None: ...

class ImportModelRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ImportModelHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ImportModelHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ImportModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...
