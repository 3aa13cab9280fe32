"""2-D convolution (cross-correlation) over NCHW batches: im2col + GEMM, forward and backward.

Forward, for sample n and kernel k (as in the spec's sum):

    y[n, k, r, c] = sum_{ch, a, b} xpad[n, ch, r*sh + a, c*sw + b] * w[k, ch, a, b] + bias[k]

The receptive fields of a block of m samples are unrolled side by side into ``col`` of shape
(C*kh*kw, m*OH*OW), so the block is one GEMM: ``Y = w.reshape(K, C*kh*kw) @ col``. Blocking
several samples makes the GEMM wide enough to run near the BLAS rate even for the small layers
of LeNet-type nets, while ``col`` stays within a cache-friendly budget. Backward reuses the
unrolling:

* dL/dw is the cross-correlation of the input with the upstream gradient: ``dw = dY @ col.T``
  summed over blocks;
* dL/dx is the full convolution of the upstream gradient with the kernel (cross-correlation with
  the flipped kernel); as a GEMM it is ``col2im(w.T @ dY)``: every output position scatters its
  gradient back through the kernel onto the input pixels it read, which is the same sum;
* dL/dbias sums the upstream gradient over batch and positions.

3x3 stride-1 layers of 16 or more channels compute the forward pass with Winograd's
F(2x2, 3x3) instead (``winograd.py``), and so does dL/dx of those with 32 or more; dL/dw stays
here.

With ``relu`` the forward applies the rectifier while it writes the output (fused bias + ReLU),
and the backward, given that output, applies the ReLU's derivative while it gathers dY, so the
ReLU layer costs no pass of its own.

Samples are split into one contiguous range per thread (``prange``), each with its own
workspace and weight-gradient buffer, reduced in a fixed order: for a fixed thread count the
result does not depend on scheduling. With one range the serial driver runs instead, which
saves waking the thread team. ``np.dot`` calls BLAS, held to one thread (``_runtime``).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from cnnd.core import _runtime  # noqa: F401  (threading layer, cache dir, BLAS threads)
from cnnd.core.kernels import winograd
from cnnd.core.kernels.gemm import gemm
from cnnd.core.kernels.loops import add_into, copy_into, fill_zero, relu_mask_into
from cnnd.core.kernels.workspace import Workspace

# dL/dx by Winograd from this many channels (in and out). Measured on the CIFAR-type net,
# training samples/s at batch 32 / 128: GEMM + col2im for every layer 746 / 773; Winograd for
# its 64 -> 64 layer 793 / 845; for its three layers of 32 and more 881 / 979.
WINOGRAD_DX_MIN = 32
COL_BUDGET = 1 << 19  # floats of one block's unrolled input (2 MiB in float32)
KEEP_BYTES = 64 << 20  # largest unrolled batch kept from forward to backward, per layer
_SCRATCH = Workspace()  # for callers without a workspace of their own (one per thread)


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
def im2col(x, kh, kw, sh, sw, ph, pw, OH, OW, col, off):
    """Unroll one sample x (C, H, W) into columns [off, off + OH*OW) of col (C*kh*kw, L);
    padding reads as zero."""
    C = x.shape[0]
    H, W = x.shape[1], x.shape[2]
    P = OH * OW
    if sh == 1 and sw == 1 and OW == W:
        _im2col_same(x, kh, kw, ph, pw, OH, col, off)
        return
    for ch in range(C):
        for a in range(kh):
            r_lo, r_hi = _valid_range(H, OH, a, sh, ph)
            for b in range(kw):
                c_lo, c_hi = _valid_range(W, OW, b, sw, pw)
                row = col[(ch * kh + a) * kw + b, off : off + P]
                fill_zero(row[: r_lo * OW])
                fill_zero(row[r_hi * OW :])
                s0 = c_lo * sw - pw + b
                for r in range(r_lo, r_hi):
                    dst = row[r * OW : (r + 1) * OW]
                    src = x[ch, r * sh - ph + a]
                    fill_zero(dst[:c_lo])
                    if sw == 1:
                        copy_into(dst[c_lo:c_hi], src[s0 : s0 + c_hi - c_lo])
                    else:
                        for c in range(c_lo, c_hi):
                            dst[c] = src[s0 + (c - c_lo) * sw]
                    fill_zero(dst[c_hi:])


@njit(nogil=True, cache=True)
def _im2col_same(x, kh, kw, ph, pw, OH, col, off):
    """im2col for stride 1 and an output as wide as the input (3x3 with padding 1, ...):
    each row of col is then the input plane shifted by one offset, so it is one contiguous
    copy, after which the columns that wrapped around a row edge are zeroed. About 5x faster
    than copying row by row for the 16- and 32-wide planes of CIFAR-type nets."""
    C, H, W = x.shape
    P = OH * W
    xf = x.reshape(C * H * W)
    for ch in range(C):
        for a in range(kh):
            r_lo, r_hi = _valid_range(H, OH, a, 1, ph)
            for b in range(kw):
                c_lo, c_hi = _valid_range(W, W, b, 1, pw)
                row = col[(ch * kh + a) * kw + b, off : off + P]
                fill_zero(row[: r_lo * W])
                fill_zero(row[r_hi * W :])
                if r_hi > r_lo:
                    s = ch * H * W + (a - ph) * W + (b - pw)
                    j0 = r_lo * W
                    j1 = r_hi * W
                    # Clamp the copy to the plane; the clipped ends are wrapped columns.
                    lo = max(j0, -s + ch * H * W)
                    hi = min(j1, ch * H * W + H * W - s)
                    fill_zero(row[j0:lo])
                    copy_into(row[lo:hi], xf[s + lo : s + hi])
                    fill_zero(row[hi:j1])
                    for r in range(r_lo, r_hi):
                        for c in range(c_lo):
                            row[r * W + c] = 0
                        for c in range(c_hi, W):
                            row[r * W + c] = 0


@njit(nogil=True, cache=True)
def _col2im_same(col, off, kh, kw, ph, pw, OH, dx):
    """col2im for the case of _im2col_same: zero the wrapped columns of each row of col (a
    scratch buffer), then add the row back as one contiguous run. Each pixel receives its
    terms in the same order as in the general loop, so the result is the same to the bit."""
    C, H, W = dx.shape
    P = OH * W
    xf = dx.reshape(C * H * W)
    for ch in range(C):
        for a in range(kh):
            r_lo, r_hi = _valid_range(H, OH, a, 1, ph)
            if r_hi <= r_lo:
                continue
            for b in range(kw):
                c_lo, c_hi = _valid_range(W, W, b, 1, pw)
                row = col[(ch * kh + a) * kw + b, off : off + P]
                for r in range(r_lo, r_hi):
                    for c in range(c_lo):
                        row[r * W + c] = 0
                    for c in range(c_hi, W):
                        row[r * W + c] = 0
                s = ch * H * W + (a - ph) * W + (b - pw)
                lo = max(r_lo * W, -s + ch * H * W)
                hi = min(r_hi * W, ch * H * W + H * W - s)
                add_into(xf[s + lo : s + hi], row[lo:hi])


@njit(nogil=True, cache=True)
def col2im(col, off, kh, kw, sh, sw, ph, pw, OH, OW, dx):
    """Adjoint of im2col: add columns [off, off + OH*OW) of col back onto dx (C, H, W), which
    must be zero."""
    C, H, W = dx.shape
    if sh == 1 and sw == 1 and OW == W:
        _col2im_same(col, off, kh, kw, ph, pw, OH, dx)
        return
    # Flat indices, no per-row slices: the rows are short (often < 16 values), and building a
    # view per row cost more than the additions (measured 3x slower on LeNet's second conv).
    xf = dx.reshape(C * H * W)
    L = col.shape[1]
    cf = col.reshape(col.shape[0] * L)
    for ch in range(C):
        for a in range(kh):
            r_lo, r_hi = _valid_range(H, OH, a, sh, ph)
            for b in range(kw):
                c_lo, c_hi = _valid_range(W, OW, b, sw, pw)
                base = ((ch * kh + a) * kw + b) * L + off
                for r in range(r_lo, r_hi):
                    d = base + r * OW
                    s = (ch * H + r * sh - ph + a) * W - pw + b
                    if sw == 1:
                        for c in range(c_lo, c_hi):
                            xf[s + c] += cf[d + c]
                    else:
                        for c in range(c_lo, c_hi):
                            xf[s + c * sw] += cf[d + c]


@njit(nogil=True, cache=True)
def _im2col_wide(x, kh, kw, ph, OH, col, off):
    """im2col for stride 1 without horizontal padding, on a grid as wide as the input: output
    row r keeps all W columns, of which the last kw-1 are junk (dropped by the epilogue, zero
    in dY). Each row of col is then one contiguous slice of the input, instead of OH short
    copies (LeNet's second conv: 10-wide rows, ~5x faster)."""
    C, H, W = x.shape
    P = OH * W
    xf = x.reshape(C * H * W)
    for ch in range(C):
        for a in range(kh):
            r_lo, r_hi = _valid_range(H, OH, a, 1, ph)
            for b in range(kw):
                row = col[(ch * kh + a) * kw + b, off : off + P]
                fill_zero(row[: r_lo * W])
                fill_zero(row[r_hi * W :])
                if r_hi > r_lo:
                    s = ch * H * W + (a - ph) * W + b
                    j0, j1 = r_lo * W, r_hi * W
                    hi = min(j1, C * H * W - s)  # the last junk columns may pass the end
                    copy_into(row[j0:hi], xf[s + j0 : s + hi])
                    fill_zero(row[hi:j1])


@njit(nogil=True, cache=True)
def _col2im_wide(col, off, kh, kw, ph, OH, dx):
    """Adjoint of _im2col_wide. The junk columns of col are exact zeros (they come from zero
    columns of dY), so adding them onto the pixels they alias changes nothing."""
    C, H, W = dx.shape
    P = OH * W
    xf = dx.reshape(C * H * W)
    for ch in range(C):
        for a in range(kh):
            r_lo, r_hi = _valid_range(H, OH, a, 1, ph)
            if r_hi <= r_lo:
                continue
            for b in range(kw):
                row = col[(ch * kh + a) * kw + b, off : off + P]
                s = ch * H * W + (a - ph) * W + b
                j0, j1 = r_lo * W, r_hi * W
                hi = min(j1, C * H * W - s)
                add_into(xf[s + j0 : s + hi], row[j0:hi])


@njit(nogil=True, cache=True)
def _unroll(x, kh, kw, sh, sw, ph, pw, OH, OW, Wc, col, off):
    if Wc != OW:
        _im2col_wide(x, kh, kw, ph, OH, col, off)
    else:
        im2col(x, kh, kw, sh, sw, ph, pw, OH, OW, col, off)


@njit(nogil=True, cache=True)
def _fold(col, off, kh, kw, sh, sw, ph, pw, OH, OW, Wc, dx):
    if Wc != OW:
        _col2im_wide(col, off, kh, kw, ph, OH, dx)
    else:
        col2im(col, off, kh, kw, sh, sw, ph, pw, OH, OW, dx)


@njit(nogil=True, cache=True)
def _forward_range(x, w2t, bias, kh, kw, sh, sw, ph, pw, relu, out, lo, hi, nb, col_ws, y_ws,
                   cols, keep, Wc, fast):  # fmt: skip
    CKK, K = w2t.shape
    OH, OW = out.shape[2], out.shape[3]
    P = OH * Wc  # positions per sample in col (Wc > OW: a wide grid, see _im2col_wide)
    n = lo
    while n < hi:
        m = min(nb, hi - n)
        if keep:  # unroll into the batch-wide buffer the backward pass will read
            col = cols[n * CKK * P : (n + m) * CKK * P].reshape(CKK, m * P)
        else:
            col = col_ws[: CKK * m * P].reshape(CKK, m * P)
        for i in range(m):
            _unroll(x[n + i], kh, kw, sh, sw, ph, pw, OH, OW, Wc, col, i * P)
        # Position-major product Y.T = col.T @ w.T: OpenBLAS runs this shape (many rows, few
        # columns) 1.3-1.8x faster than w @ col, measured on these layers; gemm.py's kernel
        # faster still for narrow layers (``fast``, see conv2d_forward).
        yt = y_ws[: m * P * K].reshape(m * P, K)
        if fast:
            gemm(col.T, w2t, yt)
        else:
            np.dot(col.T, w2t, yt)
        # Epilogue: transpose into NCHW with bias (and ReLU), one output row at a time so
        # that the rows of Y.T being read stay in L1.
        for i in range(m):
            o = out[n + i].reshape(K, OH * OW)
            for r in range(OH):
                base = i * P + r * Wc
                for k in range(K):
                    bk = bias[k]
                    for c in range(OW):
                        v = yt[base + c, k] + bk
                        o[k, r * OW + c] = (0 if v <= 0 else v) if relu else v  # NaN stays
        n += m


@njit(nogil=True, cache=True, parallel=True)
def _forward_parallel(x, w2t, bias, kh, kw, sh, sw, ph, pw, relu, out, T, nb, col_ws, y_ws,
                      cols, keep, Wc, fast):  # fmt: skip
    N = x.shape[0]
    for t in prange(T):
        _forward_range(x, w2t, bias, kh, kw, sh, sw, ph, pw, relu, out, t * N // T,
                       (t + 1) * N // T, nb, col_ws[t], y_ws[t], cols, keep, Wc, fast)  # fmt: skip


@njit(nogil=True, cache=True)
def _forward_serial(x, w2t, bias, kh, kw, sh, sw, ph, pw, relu, out, nb, col_ws, y_ws, cols,
                    keep, Wc, fast):  # fmt: skip
    _forward_range(x, w2t, bias, kh, kw, sh, sw, ph, pw, relu, out, 0, x.shape[0], nb,
                   col_ws[0], y_ws[0], cols, keep, Wc, fast)  # fmt: skip


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _sum64(a):
    """Sum in float64. Reassociation lets the loop run in vector lanes (a serial chain of
    dependent adds cost more than the rest of the gather); the order is still fixed at compile
    time, so results stay deterministic, and NaN and inf still propagate."""
    s = 0.0
    for v in a:
        s += v
    return s


@njit(nogil=True, cache=True)
def _backward_range(x, w2, dout, y, relu, kh, kw, sh, sw, ph, pw, need_dx, dx, lo, hi, nb,
                    col_ws, dy_ws, dcol_ws, dwt_acc, db_acc, dwt_tmp, cols, kept, Wc):  # fmt: skip
    K, CKK = w2.shape
    OH, OW = dout.shape[2], dout.shape[3]
    P = OH * Wc
    n = lo
    while n < hi:
        m = min(nb, hi - n)
        L = m * P
        if kept:  # the forward pass left this block unrolled
            col = cols[n * CKK * P : (n + m) * CKK * P].reshape(CKK, L)
        else:
            col = col_ws[: CKK * L].reshape(CKK, L)
            for i in range(m):
                _unroll(x[n + i], kh, kw, sh, sw, ph, pw, OH, OW, Wc, col, i * P)
        # dY of the block, (K, m*P), with the fused ReLU's derivative applied (and zeros in
        # the junk columns of a wide grid).
        dy = dy_ws[: K * L].reshape(K, L)
        for i in range(m):
            for k in range(K):
                plane = dy[k, i * P : (i + 1) * P]
                if Wc == OW:  # one contiguous pass over the plane
                    if relu:
                        relu_mask_into(plane, dout[n + i, k].reshape(P), y[n + i, k].reshape(P))
                    else:
                        copy_into(plane, dout[n + i, k].reshape(P))
                else:  # row by row, zeroing the junk columns of the wide grid
                    for r in range(OH):
                        dst = plane[r * Wc : (r + 1) * Wc]
                        if relu:
                            relu_mask_into(dst[:OW], dout[n + i, k, r], y[n + i, k, r])
                        else:
                            copy_into(dst[:OW], dout[n + i, k, r])
                        fill_zero(dst[OW:])
                db_acc[k] += _sum64(plane)
        # dW.T = col @ dY.T: the position-major orientation BLAS runs fastest (1.4-2x).
        np.dot(col, dy.T, dwt_tmp)
        dwt_acc += dwt_tmp
        if need_dx:
            dcol = dcol_ws[: CKK * L].reshape(CKK, L)
            np.dot(w2.T, dy, dcol)
            for i in range(m):
                dx[n + i] = 0
                _fold(dcol, i * P, kh, kw, sh, sw, ph, pw, OH, OW, Wc, dx[n + i])
        n += m


@njit(nogil=True, cache=True, parallel=True)
def _backward_parallel(x, w2, dout, y, relu, kh, kw, sh, sw, ph, pw, need_dx, dx, T, nb,
                       col_ws, dy_ws, dcol_ws, dw_acc, db_acc, dw_tmp, cols, kept, Wc):  # fmt: skip
    N = x.shape[0]
    for t in prange(T):
        dw_acc[t] = 0
        db_acc[t] = 0
        _backward_range(x, w2, dout, y, relu, kh, kw, sh, sw, ph, pw, need_dx, dx, t * N // T,
                        (t + 1) * N // T, nb, col_ws[t], dy_ws[t], dcol_ws[t], dw_acc[t],
                        db_acc[t], dw_tmp[t], cols, kept, Wc)  # fmt: skip


@njit(nogil=True, cache=True)
def _backward_serial(x, w2, dout, y, relu, kh, kw, sh, sw, ph, pw, need_dx, dx, nb,
                     col_ws, dy_ws, dcol_ws, dw_acc, db_acc, dw_tmp, cols, kept, Wc):  # fmt: skip
    dw_acc[0] = 0
    db_acc[0] = 0
    _backward_range(x, w2, dout, y, relu, kh, kw, sh, sw, ph, pw, need_dx, dx, 0, x.shape[0],
                    nb, col_ws[0], dy_ws[0], dcol_ws[0], dw_acc[0], db_acc[0], dw_tmp[0], cols,
                    kept, Wc)  # fmt: skip


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


def _grid_width(W: int, OW: int, sh: int, sw: int, pw: int) -> int:
    """Columns per output row in the unrolled input: W (a wide grid, see _im2col_wide) for
    stride 1 without horizontal padding, else OW."""
    return W if sh == 1 and sw == 1 and pw == 0 and OW != W else OW


def _plan(N: int, CKK: int, P: int) -> tuple[int, int]:
    """(threads, samples per GEMM block) for N samples whose unrolled input is CKK x P each."""
    T = max(1, min(numba.get_num_threads(), N))
    per_thread = -(-N // T)
    return T, max(1, min(per_thread, COL_BUDGET // max(CKK * P, 1)))


def conv2d_forward(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    relu: bool = False,
    out: np.ndarray | None = None,
    workspace: Workspace | None = None,
    keep_col: bool = False,
) -> np.ndarray:
    """Cross-correlate x (N, C, H, W) with w (K, C, kh, kw), add b (K,) -> y (N, K, OH, OW).

    With ``relu`` the rectifier is applied in the same pass (fused bias + ReLU). A layer passes
    its ``workspace`` so that the unrolled input is not reallocated every call; with
    ``keep_col`` (training) the unrolled input stays there, when it fits ``KEEP_BYTES``, for
    the backward pass of the same x. 3x3 stride-1 layers of 16 or more channels take
    Winograd's F(2x2, 3x3) instead (``winograd.py``: 2.25x fewer multiplies), and keep nothing.
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    N, _, H, W = x.shape
    K, C, kh, kw = w.shape
    OH, OW = conv_output_size(H, kh, sh, ph), conv_output_size(W, kw, sw, pw)
    if b is None:
        b = np.zeros(K, dtype=x.dtype)
    if x.shape[1] != C or b.shape != (K,):
        raise ValueError(f"conv2d_forward: x {x.shape}, weights {w.shape} and bias {b.shape} "
                         "do not match")  # fmt: skip
    if out is None:
        out = np.empty((N, K, OH, OW), dtype=x.dtype)
    elif out.shape != (N, K, OH, OW) or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"conv2d_forward: out must be a C-contiguous {(N, K, OH, OW)} array")
    if N == 0:
        return out
    ws = workspace or _SCRATCH
    x = np.ascontiguousarray(x)
    if winograd.applies(C, K, (kh, kw), (sh, sw)):
        ws.kept = None
        return winograd.conv3x3_forward(x, np.ascontiguousarray(w), b, (ph, pw), relu, out, ws)
    Wc = _grid_width(W, OW, sh, sw, pw)
    CKK, P = C * kh * kw, OH * Wc
    T, nb = _plan(N, CKK, P)
    col_ws = ws.get("col", (T, CKK * nb * P), x.dtype)
    y_ws = ws.get("y", (T, K * nb * P), x.dtype)
    w2t = np.ascontiguousarray(w.reshape(K, CKK).T)  # (CKK, K): the GEMM's right operand
    keep = keep_col and workspace is not None and N * CKK * P * x.itemsize <= KEEP_BYTES
    cols = ws.get("cols", (N * CKK * P,), x.dtype) if keep else col_ws[0]
    ws.kept = (id(x), x.shape, T, nb) if keep else None
    # gemm.py's kernel where it measured faster than OpenBLAS on col.T @ w.T: 8-32 output
    # channels (LeNet's 6 -> 16 layer 88 vs 48 GFLOP/s, a 3 -> 32 layer 62 vs 54); at 64,
    # OpenBLAS (77 vs 66-68).
    fast = x.dtype == np.float32 and K % 8 == 0 and K <= 32  # and what gemm.py needs
    args = (x, w2t, b, kh, kw, sh, sw, ph, pw, relu, out)
    if T == 1:
        _forward_serial(*args, nb, col_ws, y_ws, cols, keep, Wc, fast)
    else:
        _forward_parallel(*args, T, nb, col_ws, y_ws, cols, keep, Wc, fast)
    return out


def conv2d_backward(
    dout: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    need_dx: bool = True,
    y: np.ndarray | None = None,
    workspace: Workspace | None = None,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Gradients of conv2d_forward: dout (N, K, OH, OW) -> (dx (N, C, H, W) or None, dw, db).

    ``y``, the output of a forward pass with fused ReLU, makes this the backward of conv+ReLU
    (dout is masked where y <= 0). ``need_dx=False`` skips dL/dx, which training never needs
    for the first layer. 3x3 stride-1 layers of ``WINOGRAD_DX_MIN`` or more channels compute
    dL/dx on Winograd's path (``_winograd_input_grad``).
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    x = np.ascontiguousarray(x)
    w = np.ascontiguousarray(w)
    dout = np.ascontiguousarray(dout)
    N = x.shape[0]
    K, C, kh, kw = w.shape
    OH, OW = dout.shape[2], dout.shape[3]
    # The kernels index by these shapes without bounds checks: refuse what does not chain.
    expected = (N, K, conv_output_size(x.shape[2], kh, sh, ph),
                conv_output_size(x.shape[3], kw, sw, pw))  # fmt: skip
    if x.shape[1] != C or dout.shape != expected:
        raise ValueError(f"conv2d_backward: dout {dout.shape} and x {x.shape} do not match "
                         f"weights {w.shape} (expected dout {expected})")  # fmt: skip
    if y is not None and y.shape != dout.shape:
        raise ValueError(f"conv2d_backward: y {y.shape} is not the shape of dout {dout.shape}")
    Wc = _grid_width(x.shape[3], OW, sh, sw, pw)
    CKK, P = C * kh * kw, OH * Wc
    dx = np.empty_like(x) if need_dx else np.empty((1, 1, 1, 1), dtype=x.dtype)
    if N == 0:
        dx[:] = 0
        return (dx if need_dx else None), np.zeros_like(w), np.zeros(K, dtype=x.dtype)
    ws = workspace or _SCRATCH
    # dL/dx on Winograd's path when the layer is wide enough (see _winograd_input_grad).
    wino_dx = need_dx and winograd.applies(K, C, (kh, kw), (sh, sw))
    wino_dx = wino_dx and min(C, K) >= WINOGRAD_DX_MIN and ph <= kh - 1 and pw <= kw - 1
    gemm_dx = need_dx and not wino_dx
    T, nb = _plan(N, CKK, P)
    col_ws = ws.get("col", (T, CKK * nb * P), x.dtype)
    dy_ws = ws.get("dy", (T, K * nb * P), x.dtype)
    dcol_ws = ws.get("dcol", (T, CKK * nb * P if gemm_dx else 1), x.dtype)
    dw_acc = ws.get("dw", (T, CKK, K), x.dtype)  # transposed: dW.T per thread
    dw_tmp = ws.get("dw_tmp", (T, CKK, K), x.dtype)
    db_acc = ws.get("db", (T, K), np.float64)
    relu = y is not None
    ymask = np.ascontiguousarray(y) if relu else dout
    w2 = w.reshape(K, CKK)
    kept = workspace is not None and getattr(ws, "kept", None) == (id(x), x.shape, T, nb)
    cols = ws.arrays["cols"] if kept else col_ws[0]
    args = (x, w2, dout, ymask, relu, kh, kw, sh, sw, ph, pw, gemm_dx, dx)
    bufs = (col_ws, dy_ws, dcol_ws, dw_acc, db_acc, dw_tmp, cols, kept, Wc)
    if T == 1:
        _backward_serial(*args, nb, *bufs)
    else:
        _backward_parallel(*args, T, nb, *bufs)
    # Reduce the per-thread sums in a fixed order (deterministic for a fixed thread count).
    dwt = dw_acc[0].copy()
    for t in range(1, T):
        dwt += dw_acc[t]
    db = db_acc.sum(axis=0).astype(x.dtype)
    if wino_dx:
        _winograd_input_grad(dout, y, w, (ph, pw), dx, ws.child("dx"))
    return (dx if need_dx else None), np.ascontiguousarray(dwt.T).reshape(w.shape), db


def _winograd_input_grad(
    dout: np.ndarray,
    y: np.ndarray | None,
    w: np.ndarray,
    padding: tuple[int, int],
    dx: np.ndarray,
    ws: Workspace,
) -> np.ndarray:
    """dL/dx of a stride-1 3x3 layer as what it is, the full convolution of dY with the
    flipped kernel: a cross-correlation of dY (masked where the fused ReLU's output y is not
    positive), padded by 2 - p, with w transposed (C outputs from K inputs) and flipped, on
    the Winograd path. Written into dx."""
    K, C, kh, kw = w.shape
    w_flip = ws.get("w_flip", (C, K, kh, kw), w.dtype)
    w_flip[...] = w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
    zeros = ws.get("zero_bias", (C,), w.dtype)
    zeros[:] = 0
    q = (kh - 1 - padding[0], kw - 1 - padding[1])
    return winograd.conv3x3_forward(dout, w_flip, zeros, q, False, dx, ws, mask=y)
