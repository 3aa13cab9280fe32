"""cnnd.core: a CNN engine on Numba kernels.

    >>> from cnnd.core import Sequential, fit, SGD
    >>> model = Sequential.from_spec(spec, seed=0)
    >>> fit(model, x, y, epochs=10, batch_size=32, optimizer=SGD(lr=0.05, momentum=0.9))

Arrays are NCHW float32 as in PyTorch; conv weights are (out_channels, in_channels, kh, kw).
"""

from cnnd.core import _runtime
from cnnd.core.io import load_model, load_npz, model_arrays, model_from_arrays, save_model
from cnnd.core.model import Sequential
from cnnd.core.optim import SGD, Adam, AdamW, Optimizer, Schedule, make_optimizer
from cnnd.core.spec import LayerInfo, SpecError, SpecLimits, SpecSummary, validate_spec
from cnnd.core.train import (
    EpochResult,
    FitResult,
    NonFiniteLossError,
    StepEvent,
    TrainState,
    as_float,
    evaluate,
    fit,
    predict,
    stratified_split,
)

num_threads = _runtime.num_threads
threading_layer = _runtime.threading_layer

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "EpochResult",
    "FitResult",
    "LayerInfo",
    "NonFiniteLossError",
    "Optimizer",
    "Schedule",
    "Sequential",
    "SpecError",
    "SpecLimits",
    "SpecSummary",
    "StepEvent",
    "TrainState",
    "as_float",
    "evaluate",
    "fit",
    "load_model",
    "load_npz",
    "make_optimizer",
    "model_arrays",
    "model_from_arrays",
    "num_threads",
    "predict",
    "save_model",
    "stratified_split",
    "threading_layer",
    "validate_spec",
]
