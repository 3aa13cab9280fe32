"""Fully connected layer: y = x @ w.T + b, with w (out_features, in_features) as in PyTorch.

The batch is split into one contiguous block of rows per thread; each block is one GEMM.
Backward gives dx = dy @ w, dw = dy.T @ x and db = sum of dy over the batch, the weight
gradient summed per thread and reduced in a fixed order. As for convolutions, a fused ReLU is
applied in the forward's epilogue and its derivative in the backward's first pass.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from cnnd.core import _runtime  # noqa: F401

PARALLEL_MIN_MACS = 1 << 17  # below this a thread team costs more than it saves


@njit(nogil=True, cache=True)
def _forward_rows(x, w, b, relu, out, lo, hi):
    y = out[lo:hi]
    np.dot(x[lo:hi], w.T, y)
    O = w.shape[0]
    for i in range(hi - lo):
        row = y[i]
        for o in range(O):
            v = row[o] + b[o]
            row[o] = 0 if relu and v <= 0 else v


@njit(nogil=True, cache=True, parallel=True)
def _forward_parallel(x, w, b, relu, out, T):
    N = x.shape[0]
    for t in prange(T):
        _forward_rows(x, w, b, relu, out, t * N // T, (t + 1) * N // T)


@njit(nogil=True, cache=True)
def _forward_serial(x, w, b, relu, out):
    _forward_rows(x, w, b, relu, out, 0, x.shape[0])


@njit(nogil=True, cache=True)
def _backward_rows(dout, x, w, y, relu, need_dx, dx, lo, hi, dy, dw):
    O = w.shape[0]
    d = dy[lo:hi]
    for i in range(hi - lo):
        for o in range(O):
            g = dout[lo + i, o]
            d[i, o] = 0 if relu and y[lo + i, o] <= 0 else g
    np.dot(d.T, x[lo:hi], dw)
    if need_dx:
        np.dot(d, w, dx[lo:hi])


@njit(nogil=True, cache=True, parallel=True)
def _backward_parallel(dout, x, w, y, relu, need_dx, dx, dy, dw_t, T):
    N = x.shape[0]
    for t in prange(T):
        _backward_rows(dout, x, w, y, relu, need_dx, dx, t * N // T, (t + 1) * N // T, dy,
                       dw_t[t])  # fmt: skip


@njit(nogil=True, cache=True)
def _backward_serial(dout, x, w, y, relu, need_dx, dx, dy, dw_t):
    _backward_rows(dout, x, w, y, relu, need_dx, dx, 0, x.shape[0], dy, dw_t[0])


def _threads(N: int, macs: int) -> int:
    return 1 if macs < PARALLEL_MIN_MACS else max(1, min(numba.get_num_threads(), N))


def linear_forward(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, relu: bool = False
) -> np.ndarray:
    """x (N, F) @ w.T (F, O) + b (O,) -> y (N, O); ``relu`` fuses the rectifier."""
    N, O = x.shape[0], w.shape[0]
    if b is None:
        b = np.zeros(O, dtype=x.dtype)
    out = np.empty((N, O), dtype=x.dtype)
    if N == 0:
        return out
    x = np.ascontiguousarray(x)
    w = np.ascontiguousarray(w)
    T = _threads(N, N * w.size)
    if T == 1:
        _forward_serial(x, w, b, relu, out)
    else:
        _forward_parallel(x, w, b, relu, out, T)
    return out


def linear_backward(
    dout: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    need_dx: bool = True,
    y: np.ndarray | None = None,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """dout (N, O) -> (dx (N, F) or None, dw (O, F), db (O,)). ``y``, the output of a forward
    pass with fused ReLU, masks dout where y <= 0."""
    x = np.ascontiguousarray(x)
    w = np.ascontiguousarray(w)
    N = x.shape[0]
    dx = np.empty_like(x) if need_dx else np.empty((1, 1), dtype=x.dtype)
    if N == 0:
        dx[:] = 0
        return (dx if need_dx else None), np.zeros_like(w), np.zeros(w.shape[0], dtype=x.dtype)
    dout = np.ascontiguousarray(dout)
    relu = y is not None
    ymask = np.ascontiguousarray(y) if relu else dout
    dy = np.empty_like(dout)
    T = _threads(N, N * w.size)
    dw_t = np.empty((T, *w.shape), dtype=x.dtype)
    if T == 1:
        _backward_serial(dout, x, w, ymask, relu, need_dx, dx, dy, dw_t)
    else:
        _backward_parallel(dout, x, w, ymask, relu, need_dx, dx, dy, dw_t, T)
    dw = dw_t[0].copy()
    for t in range(1, T):
        dw += dw_t[t]
    db = dy.sum(axis=0, dtype=np.float64).astype(x.dtype)
    return (dx if need_dx else None), dw, db
