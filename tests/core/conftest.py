"""Shared fixtures for the engine (cnnd.core) tests.

Test modules here are named ``test_core_*.py`` because the tests tree has no ``__init__.py``
files: pytest then needs module basenames that are unique across ``tests/``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cnnd.core.layers import LAYERS, Layer
from cnnd.core.spec import validate_spec

LayerFactory = Callable[..., Layer]


@pytest.fixture
def rng() -> np.random.Generator:
    """A fixed-seed generator, fresh for every test."""
    return np.random.default_rng(20240613)


@pytest.fixture
def lenet5_spec() -> dict[str, Any]:
    """LeNet-5 on 1x32x32 inputs (LeCun et al., 1998), with ReLU and max pooling."""
    return {
        "input_shape": [1, 32, 32],
        "layers": [
            {"type": "conv2d", "out_channels": 6, "kernel_size": 5},
            {"type": "relu"},
            {"type": "maxpool2d", "kernel_size": 2},
            {"type": "conv2d", "out_channels": 16, "kernel_size": 5},
            {"type": "relu"},
            {"type": "maxpool2d", "kernel_size": 2},
            {"type": "flatten"},
            {"type": "linear", "out_features": 120},
            {"type": "relu"},
            {"type": "linear", "out_features": 84},
            {"type": "relu"},
            {"type": "linear", "out_features": 10},
        ],
    }


@pytest.fixture
def make_layer() -> LayerFactory:
    """Build one layer from its spec entry, as Sequential.from_spec would, in a chosen dtype.

    ``make_layer(entry, input_shape, dtype=np.float64, seed=0)``: ``input_shape`` is the shape
    of one sample before the layer, (C, H, W) or (features,). Parameters are initialised with
    PyTorch's defaults from ``seed`` and then cast to ``dtype``.
    """

    def factory(
        entry: dict[str, Any],
        input_shape: tuple[int, ...],
        dtype: type[np.floating] = np.float64,
        seed: int = 0,
    ) -> Layer:
        if len(input_shape) == 1:  # a flat input: reach it through a flatten layer
            spec = {"input_shape": [1, 1, input_shape[0]], "layers": [{"type": "flatten"}, entry]}
        else:
            spec = {"input_shape": list(input_shape), "layers": [entry]}
        normalised, _ = validate_spec(spec)
        layer_spec = normalised["layers"][-1]
        layer = LAYERS[layer_spec["type"]](layer_spec)
        layer.reset_parameters(np.random.default_rng(seed))
        for name, value in layer.params.items():
            layer.params[name] = value.astype(dtype)
        return layer

    return factory


DIGITS_SPEC: dict[str, Any] = {
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 64},
        {"type": "relu"},
        {"type": "linear", "out_features": 10},
    ],
}


@pytest.fixture(scope="session")
def digits_spec() -> dict[str, Any]:
    """The small CNN for 8x8 digits: conv16-pool-conv32-pool-linear64-linear10."""
    return DIGITS_SPEC


@pytest.fixture(scope="session")
def jit_warm(digits_spec: dict[str, Any]) -> None:
    """One tiny fit and evaluate of the digits CNN, so every float32 kernel they call is
    compiled (or loaded from Numba's on-disk cache) before a test times a run."""
    from cnnd.core import SGD, Sequential, evaluate, fit

    rng = np.random.default_rng(0)
    x = rng.random((16, 1, 8, 8), dtype=np.float32)
    y = np.arange(16) % 10
    model = Sequential.from_spec(digits_spec, seed=0)
    fit(model, x, y, epochs=1, batch_size=8, optimizer=SGD(lr=0.01, momentum=0.9))
    evaluate(model, x, y)
