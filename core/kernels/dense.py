"""Fully connected layer: y = x @ w.T + b, with w (out_features, in_features) as in PyTorch.

The batch is split into one contiguous block of rows per thread; each block is one GEMM.
Backward gives dx = dy @ w, dw = dy.T @ x and db = sum of dy over the batch. Each thread
computes a block of rows of dw over the whole batch (rather than a whole dw over part of the
batch): no per-thread copies of dw to sum, and the GEMM's inner dimension is the full batch.
As for convolutions, a fused ReLU is applied in the forward's epilogue and its derivative in
the backward's first pass.
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
def _mask_rows(dout, y, relu, dy, dyt, lo, hi):
    """dy = dout with the fused ReLU's derivative applied, and its transpose, rows [lo, hi)."""
    O = dout.shape[1]
    for i in range(lo, hi):
        for o in range(O):
            g = dout[i, o]
            if relu and y[i, o] <= 0:
                g = 0
            dy[i, o] = g
            dyt[o, i] = g


@njit(nogil=True, cache=True)
def _backward_block(x, w, need_dx, dx, dy, dyt, dw, t, T):
    # Thread t owns rows [o0, o1) of dW (the whole batch is the GEMM's inner dimension, so
    # there is no per-thread copy of dW to reduce) and rows [n0, n1) of dx.
    O, N = w.shape[0], x.shape[0]
    o0, o1 = t * O // T, (t + 1) * O // T
    if o1 > o0:
        np.dot(dyt[o0:o1], x, dw[o0:o1])
    n0, n1 = t * N // T, (t + 1) * N // T
    if need_dx and n1 > n0:
        np.dot(dy[n0:n1], w, dx[n0:n1])


@njit(nogil=True, cache=True, parallel=True)
def _backward_parallel(dout, x, w, y, relu, need_dx, dx, dy, dyt, dw, T):
    N = x.shape[0]
    for t in prange(T):
        _mask_rows(dout, y, relu, dy, dyt, t * N // T, (t + 1) * N // T)
    for t in prange(T):
        _backward_block(x, w, need_dx, dx, dy, dyt, dw, t, T)


@njit(nogil=True, cache=True)
def _backward_serial(dout, x, w, y, relu, need_dx, dx, dy, dyt, dw):
    _mask_rows(dout, y, relu, dy, dyt, 0, x.shape[0])
    _backward_block(x, w, need_dx, dx, dy, dyt, dw, 0, 1)


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
    dyt = np.empty((dout.shape[1], N), dtype=dout.dtype)
    dw = np.empty_like(w)
    T = _threads(N, N * w.size)
    if T == 1:
        _backward_serial(dout, x, w, ymask, relu, need_dx, dx, dy, dyt, dw)
    else:
        _backward_parallel(dout, x, w, ymask, relu, need_dx, dx, dy, dyt, dw, T)
    db = dy.sum(axis=0, dtype=np.float64).astype(x.dtype)
    return (dx if need_dx else None), dw, db
