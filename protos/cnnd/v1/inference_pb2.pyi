from cnnd.v1 import models_pb2 as _models_pb2
from cnnd.v1 import tensor_pb2 as _tensor_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InferRequest(_message.Message):
    __slots__ = ("model_id", "version", "input", "request_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    input: _tensor_pb2.Tensor
    request_id: str
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ..., input: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("model_id", "version", "logits", "probabilities", "classes", "request_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    logits: _tensor_pb2.Tensor
    probabilities: _tensor_pb2.Tensor
    classes: _containers.RepeatedScalarFieldContainer[int]
    request_id: str
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ..., logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., probabilities: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., classes: _Optional[_Iterable[int]] = ..., request_id: _Optional[str] = ...) -> None: ...

class InferStreamRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: InferRequest
    def __init__(self, request: _Optional[_Union[InferRequest, _Mapping]] = ...) -> None: ...

class InferStreamResponse(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: InferResponse
    error: _status_pb2.Status
    def __init__(self, response: _Optional[_Union[InferResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class InspectRequest(_message.Message):
    __slots__ = ("model_id", "version", "include_weights", "input", "target_class")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    version: int
    include_weights: bool
    input: _tensor_pb2.Tensor
    target_class: int
    def __init__(self, model_id: _Optional[str] = ..., version: _Optional[int] = ..., include_weights: bool = ..., input: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., target_class: _Optional[int] = ...) -> None: ...

class LayerSummary(_message.Message):
    __slots__ = ("index", "type", "output_shape", "parameters", "macs", "receptive_field", "jump")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MACS_FIELD_NUMBER: _ClassVar[int]
    RECEPTIVE_FIELD_FIELD_NUMBER: _ClassVar[int]
    JUMP_FIELD_NUMBER: _ClassVar[int]
    index: int
    type: str
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    parameters: int
    macs: int
    receptive_field: _containers.RepeatedScalarFieldContainer[int]
    jump: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[int] = ..., type: _Optional[str] = ..., output_shape: _Optional[_Iterable[int]] = ..., parameters: _Optional[int] = ..., macs: _Optional[int] = ..., receptive_field: _Optional[_Iterable[int]] = ..., jump: _Optional[_Iterable[int]] = ...) -> None: ...

class ParameterStats(_message.Message):
    __slots__ = ("name", "shape", "mean", "std", "min", "max", "l2_norm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    L2_NORM_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    mean: float
    std: float
    min: float
    max: float
    l2_norm: float
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., l2_norm: _Optional[float] = ...) -> None: ...

class InspectResponse(_message.Message):
    __slots__ = ("model", "version", "layers", "parameters", "weights", "feature_maps", "saliency", "logits", "target_class")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_MAPS_FIELD_NUMBER: _ClassVar[int]
    SALIENCY_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_FIELD_NUMBER: _ClassVar[int]
    model: _models_pb2.Model
    version: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerSummary]
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterStats]
    weights: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    feature_maps: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    saliency: _tensor_pb2.Tensor
    logits: _tensor_pb2.Tensor
    target_class: int
    def __init__(self, model: _Optional[_Union[_models_pb2.Model, _Mapping]] = ..., version: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerSummary, _Mapping]]] = ..., parameters: _Optional[_Iterable[_Union[ParameterStats, _Mapping]]] = ..., weights: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., feature_maps: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., saliency: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., target_class: _Optional[int] = ...) -> None: ...
