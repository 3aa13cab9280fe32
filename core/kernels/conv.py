"""2-D convolution (cross-correlation) over NCHW batches: im2col + GEMM, forward and backward.

Forward, for sample n and kernel k (as in the spec's sum):

    y[n, k, r, c] = sum_{ch, a, b} xpad[n, ch, r*sh + a, c*sw + b] * w[k, ch, a, b] + bias[k]

Each sample's receptive fields are unrolled into ``col`` of shape (C*kh*kw, OH*OW), so the whole
sample is one GEMM: ``y[n] = w.reshape(K, C*kh*kw) @ col``. Backward reuses the same unrolling:

* dL/dw is the cross-correlation of the input with the upstream gradient:
  ``dw = sum_n dy[n] @ col[n].T``;
* dL/dx is the full convolution of the upstream gradient with the kernel (cross-correlation with
  the flipped kernel); as a GEMM it is ``col2im(w.T @ dy[n])``: every output position scatters
  its gradient back through the kernel onto the input pixels it read, which is the same sum;
* dL/dbias sums the upstream gradient over batch and positions.

Samples are split into one contiguous chunk per thread (``prange``), each with its own ``col``
workspace and its own weight-gradient buffer, reduced in a fixed order: for a fixed thread count
the result does not depend on scheduling. ``np.dot`` calls BLAS, held to one thread
(see ``cnnd.core._runtime``).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from cnnd.core import _runtime  # noqa: F401  (threading layer, cache dir, BLAS threads)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length along one axis: floor((size + 2*padding - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


@njit(nogil=True, cache=True)
def _valid_range(size: int, out_size: int, offset: int, stride: int, pad: int) -> tuple:
    """Output indices o with 0 <= o*stride - pad + offset < size, as [lo, hi)."""
    lo = 0
    shift = pad - offset
    if shift > 0:
        lo = (shift + stride - 1) // stride
    hi = (size - 1 + shift) // stride + 1 if size - 1 + shift >= 0 else 0
    hi = min(hi, out_size)
    lo = min(lo, hi)
    return lo, hi


@njit(nogil=True, cache=True)
def im2col(x, kh, kw, sh, sw, ph, pw, OH, OW, col):
    """Unroll one sample x (C, H, W) into col (C*kh*kw, OH*OW); padding reads as zero."""
    C, H, W = x.shape
    for ch in range(C):
        for a in range(kh):
            r_lo, r_hi = _valid_range(H, OH, a, sh, ph)
            for b in range(kw):
                c_lo, c_hi = _valid_range(W, OW, b, sw, pw)
                row = col[(ch * kh + a) * kw + b]
                row[: r_lo * OW] = 0
                row[r_hi * OW :] = 0
                for r in range(r_lo, r_hi):
                    base = r * OW
                    src = x[ch, r * sh - ph + a]
                    for c in range(c_lo):
                        row[base + c] = 0
                    for c in range(c_lo, c_hi):
                        row[base + c] = src[c * sw - pw + b]
                    for c in range(c_hi, OW):
                        row[base + c] = 0


@njit(nogil=True, cache=True)
def col2im(col, kh, kw, sh, sw, ph, pw, OH, OW, dx):
    """Adjoint of im2col: add col (C*kh*kw, OH*OW) back onto dx (C, H, W), which must be zero."""
    C, H, W = dx.shape
    for ch in range(C):
        for a in range(kh):
            r_lo, r_hi = _valid_range(H, OH, a, sh, ph)
            for b in range(kw):
                c_lo, c_hi = _valid_range(W, OW, b, sw, pw)
                row = col[(ch * kh + a) * kw + b]
                for r in range(r_lo, r_hi):
                    base = r * OW
                    dst = dx[ch, r * sh - ph + a]
                    for c in range(c_lo, c_hi):
                        dst[c * sw - pw + b] += row[base + c]


@njit(nogil=True, cache=True, parallel=True)
def _conv2d_forward(x, w, bias, sh, sw, ph, pw, relu, out, threads):
    N, C = x.shape[0], x.shape[1]
    K, _, kh, kw = w.shape
    OH, OW = out.shape[2], out.shape[3]
    w2 = w.reshape(K, C * kh * kw)
    T = min(threads, N)
    for t in prange(T):
        col = np.empty((C * kh * kw, OH * OW), dtype=x.dtype)
        for n in range(t * N // T, (t + 1) * N // T):
            im2col(x[n], kh, kw, sh, sw, ph, pw, OH, OW, col)
            y = out[n].reshape(K, OH * OW)
            np.dot(w2, col, y)
            for k in range(K):
                yk = y[k]
                bk = bias[k]
                if relu:
                    for i in range(OH * OW):
                        v = yk[i] + bk
                        yk[i] = 0 if v <= 0 else v  # NaN passes through, as in PyTorch
                else:
                    for i in range(OH * OW):
                        yk[i] += bk


@njit(nogil=True, cache=True, parallel=True)
def _conv2d_backward(x, w, dout, sh, sw, ph, pw, need_dx, dx, dw, dbias, threads):
    N, C = x.shape[0], x.shape[1]
    K, _, kh, kw = w.shape
    OH, OW = dout.shape[2], dout.shape[3]
    CKK = C * kh * kw
    w2 = w.reshape(K, CKK)
    w2t = w2.T
    T = min(threads, N)
    dw_t = np.zeros((T, K, CKK), dtype=x.dtype)
    db_t = np.zeros((T, K), dtype=np.float64)
    for t in prange(T):
        col = np.empty((CKK, OH * OW), dtype=x.dtype)
        dcol = np.empty((CKK, OH * OW), dtype=x.dtype)
        dw_n = np.empty((K, CKK), dtype=x.dtype)
        for n in range(t * N // T, (t + 1) * N // T):
            dy = dout[n].reshape(K, OH * OW)
            im2col(x[n], kh, kw, sh, sw, ph, pw, OH, OW, col)
            np.dot(dy, col.T, dw_n)
            dw_t[t] += dw_n
            for k in range(K):
                db_t[t, k] += dy[k].sum()
            if need_dx:
                np.dot(w2t, dy, dcol)
                dx[n] = 0
                col2im(dcol, kh, kw, sh, sw, ph, pw, OH, OW, dx[n])
    dw2 = dw.reshape(K, CKK)
    dw2[:] = dw_t[0]
    for t in range(1, T):
        dw2 += dw_t[t]
    for k in range(K):
        s = 0.0
        for t in range(T):
            s += db_t[t, k]
        dbias[k] = s


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


def conv2d_forward(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    relu: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Cross-correlate x (N, C, H, W) with w (K, C, kh, kw), add b (K,) -> y (N, K, OH, OW).

    With ``relu`` the rectifier is applied in the same pass (fused bias + ReLU).
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    N, _, H, W = x.shape
    K, _, kh, kw = w.shape
    OH, OW = conv_output_size(H, kh, sh, ph), conv_output_size(W, kw, sw, pw)
    if b is None:
        b = np.zeros(K, dtype=x.dtype)
    if out is None:
        out = np.empty((N, K, OH, OW), dtype=x.dtype)
    if N:
        _conv2d_forward(
            np.ascontiguousarray(x),
            np.ascontiguousarray(w),
            b,
            sh,
            sw,
            ph,
            pw,
            relu,
            out,
            numba.get_num_threads(),
        )
    return out


def conv2d_backward(
    dout: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    need_dx: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Gradients of conv2d_forward: dout (N, K, OH, OW) -> (dx (N, C, H, W) or None, dw, db).

    ``need_dx=False`` skips dL/dx, which training never needs for the first layer.
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    x = np.ascontiguousarray(x)
    w = np.ascontiguousarray(w)
    dout = np.ascontiguousarray(dout)
    dx = np.empty_like(x) if need_dx else np.empty((1, 1, 1, 1), dtype=x.dtype)
    dw = np.empty_like(w)
    db = np.empty(w.shape[0], dtype=x.dtype)
    if x.shape[0] == 0:
        dw[:] = 0
        db[:] = 0
        dx[:] = 0
    else:
        _conv2d_backward(x, w, dout, sh, sw, ph, pw, need_dx, dx, dw, db, numba.get_num_threads())
    return (dx if need_dx else None), dw, db
