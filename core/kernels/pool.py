"""Max and average pooling over NCHW batches, forward and backward.

Both follow PyTorch's defaults: stride defaults to the kernel size, no ceil mode. Max pooling
treats padding as -inf (a padded cell never wins) and routes the gradient to the argmax, the
first maximum in row-major window order as PyTorch does. Average pooling counts the padding in
the divisor (``count_include_pad=True``), so every window divides by kh*kw.

Planes (n, c) are independent, so the kernels run ``prange`` over N*C.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from cnnd.core import _runtime  # noqa: F401
from cnnd.core.kernels.conv import _pair, conv_output_size

PARALLEL_MIN = 1 << 15  # elements below which one thread is faster


@njit(nogil=True, cache=True)
def _maxpool_planes(xf, H, W, kh, kw, sh, sw, ph, pw, OH, OW, out, argmax, lo, hi):
    """Planes [lo, hi) of x (flat (N*C*H*W,)) into out/argmax (flat (N*C*OH*OW,))."""
    for p in range(lo, hi):
        for r in range(OH):
            _maxpool_row(xf, p * H * W, H, W, kh, kw, sh, sw, ph, pw, r, OW, out, argmax,
                         p * OH * OW + r * OW)  # fmt: skip


@njit(nogil=True, cache=True)
def _maxpool2x2_planes(xf, H, W, OH, OW, out, argmax, lo, hi):
    """_maxpool_planes for the common 2x2 window with stride 2 and no padding, with the same
    tie and NaN rules. The inner loop is branch-free so that it vectorises (on real activations
    the comparisons are coin flips, and mispredicted branches cost more than the reads); a row
    that holds a NaN is redone by the general loop."""
    for p in range(lo, hi):
        xb = p * H * W
        ob = p * OH * OW
        for r in range(OH):
            i0 = 2 * r * W
            o0 = ob + r * OW
            nan = False
            for q in range(OW):
                i = i0 + 2 * q
                v0, v1 = xf[xb + i], xf[xb + i + 1]
                v2, v3 = xf[xb + i + W], xf[xb + i + W + 1]
                c = v1 > v0  # strictly greater: the first maximum wins
                best = v1 if c else v0
                bi = i + 1 if c else i
                c = v2 > best
                best = v2 if c else best
                bi = i + W if c else bi
                c = v3 > best
                best = v3 if c else best
                bi = i + W + 1 if c else bi
                out[o0 + q] = best
                argmax[o0 + q] = bi
                nan |= (v0 != v0) | (v1 != v1) | (v2 != v2) | (v3 != v3)  # noqa: PLR0124
            if nan:
                _maxpool_row(xf, xb, H, W, 2, 2, 2, 2, 0, 0, r, OW, out, argmax, o0)


@njit(nogil=True, cache=True)
def _maxpool_row(xf, xb, H, W, kh, kw, sh, sw, ph, pw, r, OW, out, argmax, o0):
    """Output row r of the plane at xf[xb:] into out/argmax[o0:]."""
    h0 = r * sh - ph
    a_lo, a_hi = max(h0, 0), min(h0 + kh, H)
    for q in range(OW):
        w0 = q * sw - pw
        b_lo, b_hi = max(w0, 0), min(w0 + kw, W)
        best_i = a_lo * W + b_lo
        best = xf[xb + best_i]
        nan_i = -1
        for a in range(a_lo, a_hi):
            for b in range(b_lo, b_hi):
                i = a * W + b
                v = xf[xb + i]
                if v > best:  # strictly: the first maximum wins, as in PyTorch
                    best = v
                    best_i = i
                if v != v and nan_i < 0:  # noqa: PLR0124  (NaN test, kept cheap)
                    nan_i = i
        if nan_i >= 0:  # PyTorch propagates NaN: the first one wins the window
            best = xf[xb + nan_i]
            best_i = nan_i
        out[o0 + q] = best
        argmax[o0 + q] = best_i


@njit(nogil=True, cache=True)
def _maxpool_any(xf, H, W, kh, kw, sh, sw, ph, pw, OH, OW, out, argmax, lo, hi):
    if kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0:
        _maxpool2x2_planes(xf, H, W, OH, OW, out, argmax, lo, hi)
    else:
        _maxpool_planes(xf, H, W, kh, kw, sh, sw, ph, pw, OH, OW, out, argmax, lo, hi)


@njit(nogil=True, cache=True, parallel=True)
def _maxpool_parallel(xf, H, W, kh, kw, sh, sw, ph, pw, OH, OW, out, argmax, planes, T):
    for t in prange(T):
        _maxpool_any(xf, H, W, kh, kw, sh, sw, ph, pw, OH, OW, out, argmax,
                     t * planes // T, (t + 1) * planes // T)  # fmt: skip


@njit(nogil=True, cache=True)
def _maxpool_serial(xf, H, W, kh, kw, sh, sw, ph, pw, OH, OW, out, argmax, planes):
    _maxpool_any(xf, H, W, kh, kw, sh, sw, ph, pw, OH, OW, out, argmax, 0, planes)


@njit(nogil=True, cache=True)
def _unpool_planes(doutf, argmax, HW, OHW, dxf, lo, hi):
    for p in range(lo, hi):
        dxf[p * HW : (p + 1) * HW] = 0
        for j in range(p * OHW, (p + 1) * OHW):
            dxf[p * HW + argmax[j]] += doutf[j]


@njit(nogil=True, cache=True, parallel=True)
def _unpool_parallel(doutf, argmax, HW, OHW, dxf, planes, T):
    for t in prange(T):
        _unpool_planes(doutf, argmax, HW, OHW, dxf, t * planes // T, (t + 1) * planes // T)


@njit(nogil=True, cache=True)
def _unpool_serial(doutf, argmax, HW, OHW, dxf, planes):
    _unpool_planes(doutf, argmax, HW, OHW, dxf, 0, planes)


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
    N, C, H, W = x.shape
    out = np.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = np.empty((N, C, OH, OW), dtype=np.int32)
    xf, of, af = np.ascontiguousarray(x).reshape(-1), out.reshape(-1), argmax.reshape(-1)
    T = _threads(N * C, x.size)
    if T == 1:
        _maxpool_serial(xf, H, W, kh, kw, sh, sw, ph, pw, OH, OW, of, af, N * C)
    else:
        _maxpool_parallel(xf, H, W, kh, kw, sh, sw, ph, pw, OH, OW, of, af, N * C, T)
    return out, argmax


def maxpool2d_backward(
    dout: np.ndarray, argmax: np.ndarray, x_shape: tuple[int, ...]
) -> np.ndarray:
    """dout (N, C, OH, OW) -> dx (N, C, H, W): each gradient goes to its window's argmax."""
    dx = np.empty(x_shape, dtype=dout.dtype)
    N, C, H, W = x_shape
    OHW = dout.shape[2] * dout.shape[3]
    df, af = np.ascontiguousarray(dout).reshape(-1), argmax.reshape(-1)
    T = _threads(N * C, dx.size)
    if T == 1:
        _unpool_serial(df, af, H * W, OHW, dx.reshape(-1), N * C)
    else:
        _unpool_parallel(df, af, H * W, OHW, dx.reshape(-1), N * C, T)
    return dx


def _threads(planes: int, size: int) -> int:
    """Threads worth waking for ``size`` elements (a thread team costs ~10 us)."""
    return 1 if size < PARALLEL_MIN else max(1, min(numba.get_num_threads(), planes))


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
