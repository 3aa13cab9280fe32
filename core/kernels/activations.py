"""Elementwise nonlinearities and dropout, forward and backward, over arrays of any shape.

Each backward takes what its derivative is cheapest from: ReLU, tanh and sigmoid use their
output y (relu' = [y > 0], tanh' = 1 - y^2, sigmoid' = y (1 - y)); leaky ReLU uses its input.
The kernels work on the flat view of C-contiguous arrays; above ``PARALLEL_MIN`` elements they
split it across threads, below it a thread launch costs more than the work.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from cnnd.core import _runtime  # noqa: F401

PARALLEL_MIN = 1 << 16


@njit(nogil=True, cache=True, parallel=True)
def _relu_p(x, out):
    for i in prange(x.size):
        v = x[i]
        out[i] = 0 if v <= 0 else v  # NaN passes through, as in PyTorch


@njit(nogil=True, cache=True)
def _relu_s(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = 0 if v <= 0 else v  # NaN passes through, as in PyTorch


@njit(nogil=True, cache=True, parallel=True)
def _relu_backward_p(dout, y, dx):
    for i in prange(y.size):
        dx[i] = dout[i] if y[i] > 0 else 0


@njit(nogil=True, cache=True)
def _relu_backward_s(dout, y, dx):
    for i in range(y.size):
        dx[i] = dout[i] if y[i] > 0 else 0


@njit(nogil=True, cache=True, parallel=True)
def _leaky_relu_p(x, slope, out):
    for i in prange(x.size):
        v = x[i]
        out[i] = v if v > 0 else v * slope


@njit(nogil=True, cache=True)
def _leaky_relu_s(x, slope, out):
    for i in range(x.size):
        v = x[i]
        out[i] = v if v > 0 else v * slope


@njit(nogil=True, cache=True, parallel=True)
def _leaky_relu_backward_p(dout, x, slope, dx):
    for i in prange(x.size):
        dx[i] = dout[i] if x[i] > 0 else dout[i] * slope


@njit(nogil=True, cache=True)
def _leaky_relu_backward_s(dout, x, slope, dx):
    for i in range(x.size):
        dx[i] = dout[i] if x[i] > 0 else dout[i] * slope


@njit(nogil=True, cache=True, parallel=True)
def _tanh_p(x, out):
    for i in prange(x.size):
        out[i] = np.tanh(x[i])


@njit(nogil=True, cache=True)
def _tanh_s(x, out):
    for i in range(x.size):
        out[i] = np.tanh(x[i])


@njit(nogil=True, cache=True, parallel=True)
def _tanh_backward_p(dout, y, dx):
    for i in prange(y.size):
        dx[i] = dout[i] * (1 - y[i] * y[i])


@njit(nogil=True, cache=True)
def _tanh_backward_s(dout, y, dx):
    for i in range(y.size):
        dx[i] = dout[i] * (1 - y[i] * y[i])


@njit(nogil=True, cache=True)
def _sigmoid1(v):
    # Two branches so that exp never overflows: for v < 0, e^v / (1 + e^v).
    if v >= 0:
        return 1 / (1 + np.exp(-v))
    e = np.exp(v)
    return e / (1 + e)


@njit(nogil=True, cache=True, parallel=True)
def _sigmoid_p(x, out):
    for i in prange(x.size):
        out[i] = _sigmoid1(x[i])


@njit(nogil=True, cache=True)
def _sigmoid_s(x, out):
    for i in range(x.size):
        out[i] = _sigmoid1(x[i])


@njit(nogil=True, cache=True, parallel=True)
def _sigmoid_backward_p(dout, y, dx):
    for i in prange(y.size):
        dx[i] = dout[i] * y[i] * (1 - y[i])


@njit(nogil=True, cache=True)
def _sigmoid_backward_s(dout, y, dx):
    for i in range(y.size):
        dx[i] = dout[i] * y[i] * (1 - y[i])


@njit(nogil=True, cache=True, parallel=True)
def _mul_p(a, b, out):
    for i in prange(a.size):
        out[i] = a[i] * b[i]


@njit(nogil=True, cache=True)
def _mul_s(a, b, out):
    for i in range(a.size):
        out[i] = a[i] * b[i]


def _flat(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1)


def _unary(serial, parallel, x: np.ndarray, *args: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = np.empty(x.shape, dtype=x.dtype)
    kernel = parallel if x.size >= PARALLEL_MIN else serial
    kernel(_flat(x), *args, out.reshape(-1))
    return out


def _binary(serial, parallel, dout: np.ndarray, saved: np.ndarray, *args: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    dx = np.empty(saved.shape, dtype=saved.dtype)
    kernel = parallel if saved.size >= PARALLEL_MIN else serial
    kernel(_flat(dout), _flat(saved), *args, dx.reshape(-1))
    return dx


def relu_forward(x: np.ndarray) -> np.ndarray:
    """max(x, 0), elementwise."""
    return _unary(_relu_s, _relu_p, x)


def relu_backward(dout: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dout * [y > 0], with y the forward output."""
    return _binary(_relu_backward_s, _relu_backward_p, dout, y)


def leaky_relu_forward(x: np.ndarray, negative_slope: float) -> np.ndarray:
    """x where x > 0, else negative_slope * x."""
    return _unary(_leaky_relu_s, _leaky_relu_p, x, x.dtype.type(negative_slope))


def leaky_relu_backward(dout: np.ndarray, x: np.ndarray, negative_slope: float) -> np.ndarray:
    """dout where x > 0, else negative_slope * dout, with x the forward input."""
    return _binary(
        _leaky_relu_backward_s, _leaky_relu_backward_p, dout, x, x.dtype.type(negative_slope)
    )


def tanh_forward(x: np.ndarray) -> np.ndarray:
    """tanh(x), elementwise."""
    return _unary(_tanh_s, _tanh_p, x)


def tanh_backward(dout: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dout * (1 - y^2), with y the forward output."""
    return _binary(_tanh_backward_s, _tanh_backward_p, dout, y)


def sigmoid_forward(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), elementwise, without overflow for large |x|."""
    return _unary(_sigmoid_s, _sigmoid_p, x)


def sigmoid_backward(dout: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dout * y * (1 - y), with y the forward output."""
    return _binary(_sigmoid_backward_s, _sigmoid_backward_p, dout, y)


def dropout_mask(shape: tuple[int, ...], p: float, rng: np.random.Generator, dtype) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Inverted-dropout mask: 0 with probability p, else 1 / (1 - p), so E[mask] = 1."""
    if p >= 1:
        return np.zeros(shape, dtype=dtype)
    keep = rng.random(shape, dtype=np.float32) >= p
    return keep.astype(dtype) * dtype(1.0 / (1.0 - p))


def dropout_forward(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x * mask (training); evaluation does not call it."""
    return _binary(_mul_s, _mul_p, x, mask)


def dropout_backward(dout: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """dout * mask, with the mask drawn in the forward pass."""
    return _binary(_mul_s, _mul_p, dout, mask)
