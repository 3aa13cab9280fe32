"""Fully connected layer: y = x @ w.T + b, with w (out_features, in_features) as in PyTorch.

The batch is split into one contiguous block of rows per thread; each block is one GEMM.
Backward gives dx = dy @ w, dw = dy.T @ x and db = sum of dy over the batch, the weight
gradient summed per thread and reduced in a fixed order.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from cnnd.core import _runtime  # noqa: F401


@njit(nogil=True, cache=True, parallel=True)
def _linear_forward(x, w, b, relu, out, threads):
    N = x.shape[0]
    O = w.shape[0]
    T = min(threads, N)
    for t in prange(T):
        lo, hi = t * N // T, (t + 1) * N // T
        y = out[lo:hi]
        np.dot(x[lo:hi], w.T, y)
        for i in range(hi - lo):
            row = y[i]
            for o in range(O):
                v = row[o] + b[o]
                if relu and v < 0:
                    v = 0
                row[o] = v


@njit(nogil=True, cache=True, parallel=True)
def _linear_backward(dout, x, w, need_dx, dx, dw, db, threads):
    N = x.shape[0]
    O, F = w.shape
    T = min(threads, N)
    dw_t = np.zeros((T, O, F), dtype=x.dtype)
    for t in prange(T):
        lo, hi = t * N // T, (t + 1) * N // T
        dy = dout[lo:hi]
        np.dot(dy.T, x[lo:hi], dw_t[t])
        if need_dx:
            np.dot(dy, w, dx[lo:hi])
    dw[:] = dw_t[0]
    for t in range(1, T):
        dw += dw_t[t]
    for o in range(O):
        s = 0.0
        for n in range(N):
            s += dout[n, o]
        db[o] = s


def linear_forward(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, relu: bool = False
) -> np.ndarray:
    """x (N, F) @ w.T (F, O) + b (O,) -> y (N, O); ``relu`` fuses the rectifier."""
    N, O = x.shape[0], w.shape[0]
    if b is None:
        b = np.zeros(O, dtype=x.dtype)
    out = np.empty((N, O), dtype=x.dtype)
    if N:
        _linear_forward(
            np.ascontiguousarray(x), np.ascontiguousarray(w), b, relu, out, numba.get_num_threads()
        )
    return out


def linear_backward(
    dout: np.ndarray, x: np.ndarray, w: np.ndarray, need_dx: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """dout (N, O) -> (dx (N, F) or None, dw (O, F), db (O,))."""
    x = np.ascontiguousarray(x)
    dx = np.empty_like(x) if need_dx else np.empty((1, 1), dtype=x.dtype)
    dw = np.zeros_like(w)
    db = np.zeros(w.shape[0], dtype=x.dtype)
    if x.shape[0]:
        _linear_backward(
            np.ascontiguousarray(dout),
            x,
            np.ascontiguousarray(w),
            need_dx,
            dx,
            dw,
            db,
            numba.get_num_threads(),
        )
    elif need_dx:
        dx[:] = 0
    return (dx if need_dx else None), dw, db
