"""Finite-difference gradient checks, in float64, for every layer's backward and a whole model.

With L = sum(forward(x) * R) for a fixed random R, dL/doutput = R; each analytic gradient
(dx and every parameter's) must match centered differences (L(a + h) - L(a - h)) / 2h with a
relative error ||g - g_fd|| / (||g|| + ||g_fd||) of at most 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cnnd.core import Sequential, kernels
from cnnd.core.layers import Layer

H = 1e-6
MAX_REL_ERROR = 1e-6


def numeric_grad(loss: Callable[[], float], a: np.ndarray, h: float = H) -> np.ndarray:
    """Centered differences of loss() with respect to every entry of ``a`` (changed in place
    and restored)."""
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + h
        up = loss()
        a[idx] = old - h
        down = loss()
        a[idx] = old
        g[idx] = (up - down) / (2 * h)
    return g


def rel_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """Norm-wise relative error; both gradients must also be non-trivial to be compared."""
    na, nn = np.linalg.norm(analytic), np.linalg.norm(numeric)
    assert na > 1e-8 and nn > 1e-8, "a zero gradient proves nothing"
    return float(np.linalg.norm(analytic - numeric) / (na + nn))


def check_layer(
    layer: Layer,
    x: np.ndarray,
    train: bool,
    rng: np.random.Generator,
    before_forward: Callable[[], None] = lambda: None,
) -> None:
    """Check dx and every parameter gradient of one layer at x."""
    before_forward()
    y = layer.forward(x, train)
    assert y.dtype == np.float64
    r = rng.standard_normal(y.shape)
    dx = layer.backward(r.copy(), True)
    assert dx is not None
    analytic = {"x": dx.copy()} | {k: v.copy() for k, v in layer.grads.items()}
    assert set(analytic) == {"x", *layer.params}, "every parameter must get a gradient"

    def loss() -> float:
        before_forward()
        return float(np.sum(layer.forward(x, train) * r))

    targets = {"x": x} | layer.params
    for name, a in targets.items():
        err = rel_error(analytic[name], numeric_grad(loss, a))
        assert err <= MAX_REL_ERROR, f"d{name}: relative error {err:.2e}"


def away_from_zero(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Values with |v| in [0.1, 1.5]: no kink of relu/leaky_relu within h of any of them."""
    return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.1, 1.5, shape)


def distinct(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Distinct values 0.01 apart (shuffled): no pooling window holds a tie within h."""
    return (rng.permutation(int(np.prod(shape))) * 0.01 - 0.3).reshape(shape)


@pytest.mark.parametrize(
    ("entry", "shape"),
    [
        ({"type": "conv2d", "out_channels": 3, "kernel_size": 3}, (2, 5, 5)),
        (
            {
                "type": "conv2d",
                "out_channels": 2,
                "kernel_size": [3, 2],
                "stride": [2, 1],
                "padding": [1, 2],
            },
            (3, 6, 5),
        ),
        (
            {"type": "conv2d", "out_channels": 2, "kernel_size": 2, "stride": 3, "padding": 1},
            (2, 7, 6),
        ),
        (
            {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1, "bias": False},
            (2, 4, 4),
        ),
    ],
    ids=["plain", "stride-pad-pairs", "stride3-pad1", "no-bias"],
)
def test_conv2d_gradients(
    entry: dict[str, Any], shape: tuple[int, ...], make_layer: Any, rng: np.random.Generator
) -> None:
    """conv2d backward (dx, weight, bias) matches finite differences, with stride/padding."""
    layer = make_layer(entry, shape)
    check_layer(layer, rng.standard_normal((3, *shape)), True, rng)


@pytest.mark.parametrize(
    "entry",
    [
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "maxpool2d", "kernel_size": 3, "stride": 2, "padding": 1},
        {"type": "maxpool2d", "kernel_size": [2, 3], "stride": [1, 2], "padding": [1, 1]},
    ],
    ids=["2x2", "3x3-s2-p1", "2x3-s12-p1"],
)
def test_maxpool2d_gradients(
    entry: dict[str, Any], make_layer: Any, rng: np.random.Generator
) -> None:
    """maxpool2d backward matches finite differences (distinct values: no ties)."""
    shape = (2, 6, 5)
    check_layer(make_layer(entry, shape), distinct(rng, (2, *shape)), True, rng)


@pytest.mark.parametrize(
    "entry",
    [
        {"type": "avgpool2d", "kernel_size": 2},
        {"type": "avgpool2d", "kernel_size": 3, "stride": 2, "padding": 1},
        {"type": "avgpool2d", "kernel_size": [3, 2], "stride": 1, "padding": [1, 0]},
    ],
    ids=["2x2", "3x3-s2-p1", "3x2-s1-p10"],
)
def test_avgpool2d_gradients(
    entry: dict[str, Any], make_layer: Any, rng: np.random.Generator
) -> None:
    """avgpool2d backward matches finite differences, padding included."""
    shape = (2, 6, 5)
    check_layer(make_layer(entry, shape), rng.standard_normal((2, *shape)), True, rng)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients(bias: bool, make_layer: Any, rng: np.random.Generator) -> None:
    """linear backward (dx, weight, bias) matches finite differences."""
    layer = make_layer({"type": "linear", "out_features": 4, "bias": bias}, (7,))
    check_layer(layer, rng.standard_normal((5, 7)), True, rng)


@pytest.mark.parametrize(
    ("entry", "inputs"),
    [
        ({"type": "relu"}, away_from_zero),
        ({"type": "leaky_relu", "negative_slope": 0.1}, away_from_zero),
        ({"type": "tanh"}, lambda rng, shape: rng.standard_normal(shape)),
        ({"type": "sigmoid"}, lambda rng, shape: 2 * rng.standard_normal(shape)),
        ({"type": "flatten"}, lambda rng, shape: rng.standard_normal(shape)),
    ],
    ids=["relu", "leaky_relu", "tanh", "sigmoid", "flatten"],
)
def test_elementwise_and_flatten_gradients(
    entry: dict[str, Any], inputs: Any, make_layer: Any, rng: np.random.Generator
) -> None:
    """Activation and flatten backward match finite differences."""
    shape = (2, 3, 4)
    check_layer(make_layer(entry, shape), inputs(rng, (3, *shape)), True, rng)


def test_dropout_gradient_with_fixed_mask(make_layer: Any, rng: np.random.Generator) -> None:
    """dropout backward matches finite differences when every forward draws the same mask."""
    layer = make_layer({"type": "dropout", "p": 0.4}, (2, 3, 4))

    def same_mask() -> None:
        layer.rng = np.random.default_rng(7)

    x = rng.standard_normal((4, 2, 3, 4))
    check_layer(layer, x, True, rng, before_forward=same_mask)
    assert layer._mask is not None and (layer._mask == 0).any(), "some units must be dropped"
    # In evaluation mode dropout is the identity.
    np.testing.assert_array_equal(layer.forward(x, False), x)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm2d_gradients(
    train: bool, affine: bool, make_layer: Any, rng: np.random.Generator
) -> None:
    """batchnorm2d backward matches finite differences with batch statistics (train) and with
    running statistics (eval), for gamma/beta as well as dx."""
    layer = make_layer({"type": "batchnorm2d", "affine": affine}, (3, 3, 4))
    if affine:
        layer.params["weight"][:] = rng.uniform(0.5, 2, 3)
        layer.params["bias"][:] = rng.standard_normal(3)
    layer.buffers["running_mean"][:] = rng.standard_normal(3)
    layer.buffers["running_var"][:] = rng.uniform(0.5, 2, 3)
    check_layer(layer, 1.5 * rng.standard_normal((4, 3, 3, 4)) + 0.5, train, rng)


def test_softmax_cross_entropy_gradient(rng: np.random.Generator) -> None:
    """dL/dlogits of the mean softmax cross-entropy matches finite differences."""
    logits = 3 * rng.standard_normal((6, 5))
    labels = rng.integers(0, 5, 6)
    _, d, _ = kernels.softmax_cross_entropy(logits, labels)
    num = numeric_grad(lambda: kernels.softmax_cross_entropy(logits, labels)[0], logits)
    assert rel_error(d, num) <= MAX_REL_ERROR


SMALL_MODEL = {
    "input_shape": [2, 9, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1},
        {"type": "batchnorm2d"},
        {"type": "relu"},
        {"type": "conv2d", "out_channels": 4, "kernel_size": [2, 3], "padding": [1, 1]},
        {"type": "relu"},  # fused into the conv before it
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "conv2d", "out_channels": 3, "kernel_size": 1},
        {"type": "tanh"},
        {"type": "avgpool2d", "kernel_size": 2, "stride": 1, "padding": 1},
        {"type": "flatten"},
        {"type": "linear", "out_features": 6},
        {"type": "leaky_relu", "negative_slope": 0.2},
        {"type": "dropout", "p": 0.25},
        {"type": "linear", "out_features": 5},
        {"type": "relu"},  # fused into the linear before it
        {"type": "linear", "out_features": 4},
        {"type": "sigmoid"},
    ],
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_sequential_gradients(train: bool, rng: np.random.Generator) -> None:
    """A whole Sequential in float64 (fused conv/linear+ReLU, batchnorm, dropout, pools):
    backward's dx and every parameter gradient match finite differences of sum(out * R)."""
    model = Sequential.from_spec(SMALL_MODEL, seed=3).astype(np.float64)
    assert all(p.dtype == np.float64 for p in model.named_parameters().values())
    assert model.layers[3].fuse_relu and model.layers[13].fuse_relu
    bn = model.layers[1]
    bn.buffers["running_mean"][:] = rng.standard_normal(4) * 0.1
    bn.buffers["running_var"][:] = rng.uniform(0.5, 2, 4)
    dropout = model.layers[12]

    def forward(x: np.ndarray) -> np.ndarray:
        dropout.rng = np.random.default_rng(11)
        return model.forward(x, train=train)

    x = rng.standard_normal((4, 2, 9, 8))
    out = forward(x)
    r = rng.standard_normal(out.shape)
    dx = model.backward(r.copy(), need_input_grad=True)
    assert dx is not None and dx.shape == x.shape
    grads = {k: v.copy() for k, v in model.grads().items()}
    params = model.named_parameters()
    assert set(grads) == set(params)

    def loss() -> float:
        return float(np.sum(forward(x) * r))

    errors = {"x": rel_error(dx, numeric_grad(loss, x))}
    for name, p in params.items():
        numeric = numeric_grad(loss, p)
        if train and name == "0.bias":
            # Batch normalisation subtracts the batch mean: the bias of the conv before it
            # cannot change the output, and both gradients must vanish.
            assert np.abs(grads[name]).max() < 1e-12 and np.abs(numeric).max() < 1e-8
            continue
        errors[name] = rel_error(grads[name], numeric)
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= MAX_REL_ERROR, f"d{worst}: relative error {errors[worst]:.2e}"


def test_sequential_cross_entropy_gradient(rng: np.random.Generator) -> None:
    """The training objective itself: d(mean cross-entropy)/dx through the model is right."""
    spec = {
        "input_shape": [1, 6, 6],
        "layers": [
            {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1},
            {"type": "relu"},
            {"type": "maxpool2d", "kernel_size": 2},
            {"type": "flatten"},
            {"type": "linear", "out_features": 4},
        ],
    }
    model = Sequential.from_spec(spec, seed=1).astype(np.float64)
    x = rng.standard_normal((5, 1, 6, 6))
    y = rng.integers(0, 4, 5)
    _, d, _ = kernels.softmax_cross_entropy(model.forward(x, train=True), y)
    dx = model.backward(d)
    assert dx is not None
    grads = {k: v.copy() for k, v in model.grads().items()}

    def loss() -> float:
        return kernels.softmax_cross_entropy(model.forward(x, train=True), y)[0]

    assert rel_error(dx, numeric_grad(loss, x)) <= MAX_REL_ERROR
    for name, p in model.named_parameters().items():
        assert rel_error(grads[name], numeric_grad(loss, p)) <= MAX_REL_ERROR, name
