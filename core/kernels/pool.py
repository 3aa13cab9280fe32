"""Max and average pooling over NCHW batches, forward and backward.

Both follow PyTorch's defaults: stride defaults to the kernel size, no ceil mode. Max pooling
treats padding as -inf (a padded cell never wins) and routes the gradient to the argmax, the
first maximum in row-major window order as PyTorch does. Average pooling counts the padding in
the divisor (``count_include_pad=True``), so every window divides by kh*kw.

Planes (n, c) are independent, so the kernels run ``prange`` over N*C.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from cnnd.core import _runtime  # noqa: F401
from cnnd.core.kernels.conv import _pair, conv_output_size


@njit(nogil=True, cache=True, parallel=True)
def _maxpool2d_forward(x, kh, kw, sh, sw, ph, pw, out, argmax):
    N, C, H, W = x.shape
    OH, OW = out.shape[2], out.shape[3]
    for p in prange(N * C):
        n, c = p // C, p % C
        plane = x[n, c]
        for r in range(OH):
            h0 = r * sh - ph
            for q in range(OW):
                w0 = q * sw - pw
                best = -np.inf
                best_i = -1
                for a in range(max(h0, 0), min(h0 + kh, H)):
                    for b in range(max(w0, 0), min(w0 + kw, W)):
                        v = plane[a, b]
                        # `v > best or best_i < 0` keeps the first maximum and lets NaN win, as
                        # PyTorch does, so a NaN is never silently dropped.
                        if v > best or best_i < 0 or np.isnan(v):
                            best = v
                            best_i = a * W + b
                            if np.isnan(v):
                                break
                out[n, c, r, q] = best
                argmax[n, c, r, q] = best_i


@njit(nogil=True, cache=True, parallel=True)
def _maxpool2d_backward(dout, argmax, dx):
    N, C, H, W = dx.shape
    OH, OW = dout.shape[2], dout.shape[3]
    for p in prange(N * C):
        n, c = p // C, p % C
        flat = dx[n, c].reshape(H * W)
        flat[:] = 0
        for r in range(OH):
            for q in range(OW):
                flat[argmax[n, c, r, q]] += dout[n, c, r, q]


@njit(nogil=True, cache=True, parallel=True)
def _avgpool2d_forward(x, kh, kw, sh, sw, ph, pw, out):
    N, C, H, W = x.shape
    OH, OW = out.shape[2], out.shape[3]
    scale = 1.0 / (kh * kw)
    for p in prange(N * C):
        n, c = p // C, p % C
        plane = x[n, c]
        for r in range(OH):
            h0 = r * sh - ph
            for q in range(OW):
                w0 = q * sw - pw
                s = 0.0
                for a in range(max(h0, 0), min(h0 + kh, H)):
                    for b in range(max(w0, 0), min(w0 + kw, W)):
                        s += plane[a, b]
                out[n, c, r, q] = s * scale


@njit(nogil=True, cache=True, parallel=True)
def _avgpool2d_backward(dout, kh, kw, sh, sw, ph, pw, dx):
    N, C, H, W = dx.shape
    OH, OW = dout.shape[2], dout.shape[3]
    scale = 1.0 / (kh * kw)
    for p in prange(N * C):
        n, c = p // C, p % C
        plane = dx[n, c]
        plane[:] = 0
        for r in range(OH):
            h0 = r * sh - ph
            for q in range(OW):
                w0 = q * sw - pw
                g = dout[n, c, r, q] * scale
                for a in range(max(h0, 0), min(h0 + kh, H)):
                    for b in range(max(w0, 0), min(w0 + kw, W)):
                        plane[a, b] += g


def _pool_geometry(
    x: np.ndarray,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None,
    padding: int | tuple[int, int],
) -> tuple[int, int, int, int, int, int, int, int]:
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    H, W = x.shape[2], x.shape[3]
    return kh, kw, sh, sw, ph, pw, conv_output_size(H, kh, sh, ph), conv_output_size(W, kw, sw, pw)


def maxpool2d_forward(
    x: np.ndarray,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """x (N, C, H, W) -> (y (N, C, OH, OW), argmax (N, C, OH, OW) int32 flat index in H*W)."""
    kh, kw, sh, sw, ph, pw, OH, OW = _pool_geometry(x, kernel_size, stride, padding)
    N, C = x.shape[:2]
    out = np.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = np.empty((N, C, OH, OW), dtype=np.int32)
    _maxpool2d_forward(np.ascontiguousarray(x), kh, kw, sh, sw, ph, pw, out, argmax)
    return out, argmax


def maxpool2d_backward(
    dout: np.ndarray, argmax: np.ndarray, x_shape: tuple[int, ...]
) -> np.ndarray:
    """dout (N, C, OH, OW) -> dx (N, C, H, W): each gradient goes to its window's argmax."""
    dx = np.empty(x_shape, dtype=dout.dtype)
    _maxpool2d_backward(np.ascontiguousarray(dout), argmax, dx)
    return dx


def avgpool2d_forward(
    x: np.ndarray,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
) -> np.ndarray:
    """x (N, C, H, W) -> y (N, C, OH, OW), the mean of each window (padding counts as 0)."""
    kh, kw, sh, sw, ph, pw, OH, OW = _pool_geometry(x, kernel_size, stride, padding)
    N, C = x.shape[:2]
    out = np.empty((N, C, OH, OW), dtype=x.dtype)
    _avgpool2d_forward(np.ascontiguousarray(x), kh, kw, sh, sw, ph, pw, out)
    return out


def avgpool2d_backward(
    dout: np.ndarray,
    x_shape: tuple[int, ...],
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
) -> np.ndarray:
    """dout (N, C, OH, OW) -> dx (N, C, H, W): each window spreads its gradient evenly."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    dx = np.empty(x_shape, dtype=dout.dtype)
    _avgpool2d_backward(np.ascontiguousarray(dout), kh, kw, sh, sw, ph, pw, dx)
    return dx
