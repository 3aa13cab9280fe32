"""3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016). Each 2x2 block of
outputs is computed from a 4x4 tile d of the padded input and the 3x3 kernel g as

    Y = A^T [ (G g G^T) * (B^T d B) ] A      (* elementwise, on 4x4 matrices)

so that, after transforming the kernels once (U = G g G^T) and every input tile once
(V = B^T d B), the sum over input channels becomes 16 independent GEMMs
``M[e] = V[e] (tiles x C) @ U[e] (C x K)`` with 16 multiplies per 4 outputs instead of 36:
2.25x fewer than im2col + GEMM. The output transform adds the bias and the fused ReLU.

With C and K multiples of 8 (float32), the input and output transforms run 8 channels at a
time in LLVM IR (``_tile_in8``, ``_tile_out8``, on channels-last copies made by 8x8
transposes, ``simd.py``): the same sums in the same order, 2.6-3.5x faster than the scalar
loops alone, and on the CIFAR-type net +60% for inference and +20% for training at batch 32.

The GEMMs are position-major and run on ``gemm.py``'s register-blocked kernel when K is a
multiple of 8 (else ``np.dot``): 87 GFLOP/s on one thread for 32 channels, where OpenBLAS gave
47 in the channel-major orientation ``U[e] (K x C) @ V[e] (C x tiles)`` and 70 in this one. The
transforms walk tile by tile with the channels innermost, so that each of the 16 planes of V
and M is written and read sequentially.

It serves forward passes, and the input gradient of wide layers: dL/dx is a 3x3 convolution
of dY too (padded by 2 - p, kernels flipped and transposed, dY masked by the fused ReLU as it
is padded; see conv.py's ``_winograd_input_grad``). The weight gradient stays on im2col + GEMM,
which then unrolls the input itself instead of reading what an im2col forward would have kept:
measured on the CIFAR-type net, the Winograd forward saves more than that unrolling costs.

Results differ from im2col's in the last bits (the transforms reassociate the sums), well
inside float32 rounding of the same dot products. One difference in kind: an infinity in the
input gives NaN, not +-inf, in (most of) the outputs that read it, since the transforms
subtract it from itself; NaN reaches exactly the outputs it reaches under im2col. The service
refuses non-finite inputs, so this only shows once training has diverged.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from cnnd.core import _runtime  # noqa: F401  (threading layer, cache dir, BLAS threads)
from cnnd.core.kernels import simd
from cnnd.core.kernels.gemm import gemm
from cnnd.core.kernels.loops import copy_into, relu_mask_into
from cnnd.core.kernels.simd import transpose8, transpose8_masked
from cnnd.core.kernels.workspace import Workspace

MIN_CHANNELS = 16  # below this the transforms cost more than the GEMMs save
BLOCK_BUDGET = 1 << 19  # floats of one block's transformed input (2 MiB in float32)
PAD = 16  # floats between the 16 planes of V and M: strides of a multiple of 4 KiB alias
# in the L1 cache (measured 2-5x slower transforms on 64-channel layers without it)


def applies(C: int, K: int, kernel: tuple[int, int], stride: tuple[int, int]) -> bool:
    """Whether the Winograd path serves this convolution (and pays off: measured faster than
    im2col + GEMM from batch 1 on for 16 channels and more)."""
    return kernel == (3, 3) and stride == (1, 1) and min(C, K) >= MIN_CHANNELS


@njit(nogil=True, cache=True)
def _kernel_rows(a0, a1, a2, U, SU, r, i):
    """Row r of (G g G^T) from row r of G g: (a0, a1, a2) times G^T."""
    U[4 * r * SU + i] = a0
    U[(4 * r + 1) * SU + i] = 0.5 * (a0 + a1 + a2)
    U[(4 * r + 2) * SU + i] = 0.5 * (a0 - a1 + a2)
    U[(4 * r + 3) * SU + i] = a2


@njit(nogil=True, cache=True)
def _kernel_transform(w, U, SU):
    """U[e*SU + c*K + k] = (G g G^T)[e // 4, e % 4] for g = w[k, c], G = [[1, 0, 0],
    [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]."""
    K, C = w.shape[0], w.shape[1]
    for k in range(K):
        for c in range(C):
            i = c * K + k
            g00, g01, g02 = w[k, c, 0, 0], w[k, c, 0, 1], w[k, c, 0, 2]
            g10, g11, g12 = w[k, c, 1, 0], w[k, c, 1, 1], w[k, c, 1, 2]
            g20, g21, g22 = w[k, c, 2, 0], w[k, c, 2, 1], w[k, c, 2, 2]
            _kernel_rows(g00, g01, g02, U, SU, 0, i)
            _kernel_rows(0.5 * (g00 + g10 + g20), 0.5 * (g01 + g11 + g21),
                         0.5 * (g02 + g12 + g22), U, SU, 1, i)  # fmt: skip
            _kernel_rows(0.5 * (g00 - g10 + g20), 0.5 * (g01 - g11 + g21),
                         0.5 * (g02 - g12 + g22), U, SU, 2, i)  # fmt: skip
            _kernel_rows(g20, g21, g22, U, SU, 3, i)


@njit(nogil=True, cache=True)
def _input_transform(x, xm, masked, ph, pw, TH, TW, xp, V, SV, t0):
    """V[e, t0 + th*TW + tw, c] = (B^T d B)[e // 4, e % 4] for the 4x4 tile d at (2*th, 2*tw)
    of the padded sample, B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
    xp is the padded sample's scratch, whose border the caller has zeroed. With ``masked``, x
    counts as 0 where xm <= 0."""
    C, H, W = x.shape
    for c in range(C):
        for h in range(H):
            if masked:
                relu_mask_into(xp[c, h + ph, pw : pw + W], x[c, h], xm[c, h])
            else:
                copy_into(xp[c, h + ph, pw : pw + W], x[c, h])
    for th in range(TH):
        r = 2 * th
        for tw in range(TW):
            q = 2 * tw
            base = (t0 + th * TW + tw) * C
            for c in range(C):
                d00, d01, d02, d03 = xp[c, r, q], xp[c, r, q + 1], xp[c, r, q + 2], xp[c, r, q + 3]
                d10, d11 = xp[c, r + 1, q], xp[c, r + 1, q + 1]
                d12, d13 = xp[c, r + 1, q + 2], xp[c, r + 1, q + 3]
                d20, d21 = xp[c, r + 2, q], xp[c, r + 2, q + 1]
                d22, d23 = xp[c, r + 2, q + 2], xp[c, r + 2, q + 3]
                d30, d31 = xp[c, r + 3, q], xp[c, r + 3, q + 1]
                d32, d33 = xp[c, r + 3, q + 2], xp[c, r + 3, q + 3]
                # B^T d, row by row ...
                a0, a1, a2, a3 = d00 - d20, d01 - d21, d02 - d22, d03 - d23
                b0, b1, b2, b3 = d10 + d20, d11 + d21, d12 + d22, d13 + d23
                e0, e1, e2, e3 = d20 - d10, d21 - d11, d22 - d12, d23 - d13
                f0, f1, f2, f3 = d10 - d30, d11 - d31, d12 - d32, d13 - d33
                # ... then times B, column by column.
                t = base + c
                V[t] = a0 - a2
                V[SV + t] = a1 + a2
                V[2 * SV + t] = a2 - a1
                V[3 * SV + t] = a1 - a3
                V[4 * SV + t] = b0 - b2
                V[5 * SV + t] = b1 + b2
                V[6 * SV + t] = b2 - b1
                V[7 * SV + t] = b1 - b3
                V[8 * SV + t] = e0 - e2
                V[9 * SV + t] = e1 + e2
                V[10 * SV + t] = e2 - e1
                V[11 * SV + t] = e1 - e3
                V[12 * SV + t] = f0 - f2
                V[13 * SV + t] = f1 + f2
                V[14 * SV + t] = f2 - f1
                V[15 * SV + t] = f1 - f3


@njit(nogil=True, cache=True)
def _output_transform(M, SM, t0, bias, relu, TW, out):
    """out (K, OH, OW) = A^T m A + bias (+ ReLU) for every tile, A^T = [[1, 1, 1, 0],
    [0, 1, -1, -1]]; m[e] = M[e, t0 + th*TW + tw, k]."""
    K, OH, OW = out.shape
    TH = (OH + 1) // 2
    for th in range(TH):
        r = 2 * th
        for tw in range(TW):
            q = 2 * tw
            base = (t0 + th * TW + tw) * K
            for k in range(K):
                bk = bias[k]
                t = base + k
                m0, m1, m2, m3 = M[t], M[SM + t], M[2 * SM + t], M[3 * SM + t]
                m4, m5, m6, m7 = M[4 * SM + t], M[5 * SM + t], M[6 * SM + t], M[7 * SM + t]
                m8, m9, m10, m11 = M[8 * SM + t], M[9 * SM + t], M[10 * SM + t], M[11 * SM + t]
                m12, m13 = M[12 * SM + t], M[13 * SM + t]
                m14, m15 = M[14 * SM + t], M[15 * SM + t]
                s0, s1, s2, s3 = m0 + m4 + m8, m1 + m5 + m9, m2 + m6 + m10, m3 + m7 + m11
                u0, u1, u2, u3 = m4 - m8 - m12, m5 - m9 - m13, m6 - m10 - m14, m7 - m11 - m15
                y00 = s0 + s1 + s2 + bk
                y01 = s1 - s2 - s3 + bk
                y10 = u0 + u1 + u2 + bk
                y11 = u1 - u2 - u3 + bk
                if relu:  # NaN stays NaN, as in the im2col path
                    y00 = 0 if y00 <= 0 else y00
                    y01 = 0 if y01 <= 0 else y01
                    y10 = 0 if y10 <= 0 else y10
                    y11 = 0 if y11 <= 0 else y11
                out[k, r, q] = y00
                if q + 1 < OW:
                    out[k, r, q + 1] = y01
                if r + 1 < OH:
                    out[k, r + 1, q] = y10
                    if q + 1 < OW:
                        out[k, r + 1, q + 1] = y11


# The transforms 8 channels at a time, for C and K multiples of 8 (float32): the scalar loops
# above store to 16 planes per tile, which LLVM will not vectorise, so the tile is done in IR
# (simd.py) on a channels-last copy of the sample; the results are the same to the bit, and
# the transforms run 2.6-3.5x faster (32 and 64 channels).
@intrinsic
def _tile_in8(typingctx, xh, rs, cs, v, sv):
    """V[e] (8 channels, at v + e*sv) for the tile whose d[i][j] (8 channels) is at
    xh + i*rs + j*cs: the same sums, in the same order, as _input_transform."""
    sig = types.void(types.uintp, types.intp, types.intp, types.uintp, types.intp)

    def codegen(context, builder, signature, args):
        xh, rs, cs, v, sv = args
        x, out = simd.pointer(builder, xh), simd.pointer(builder, v)
        d = [[simd.load8(builder, x, builder.add(simd.times(builder, i, rs),
                                                 simd.times(builder, j, cs)))
              for j in range(4)] for i in range(4)]  # fmt: skip
        sub, add = builder.fsub, builder.fadd
        rows = (
            [sub(d[0][j], d[2][j]) for j in range(4)],  # B^T d, row by row ...
            [add(d[1][j], d[2][j]) for j in range(4)],
            [sub(d[2][j], d[1][j]) for j in range(4)],
            [sub(d[1][j], d[3][j]) for j in range(4)],
        )
        e = 0
        for r in rows:  # ... then times B, column by column
            for value in (sub(r[0], r[2]), add(r[1], r[2]), sub(r[2], r[1]), sub(r[1], r[3])):
                simd.store8(builder, value, out, simd.times(builder, e, sv))
                e += 1
        return context.get_dummy_value()

    return sig, codegen


def _tile_out8_kernel(relu: bool):
    @intrinsic
    def tile_out8(typingctx, m, sm, bias, dst, rs, cs):
        """The tile's 2x2 outputs for 8 channels (+ bias, ReLU) at dst + i*rs + j*cs, from
        m[e] at m + e*sm: the same sums, in the same order, as _output_transform."""
        sig = types.void(types.uintp, types.intp, types.uintp, types.uintp, types.intp,
                         types.intp)  # fmt: skip

        def codegen(context, builder, signature, args):
            m, sm, bias, dst, rs, cs = args
            mp, bp, dp = (simd.pointer(builder, a) for a in (m, bias, dst))
            mv = [simd.load8(builder, mp, simd.times(builder, e, sm)) for e in range(16)]
            bk = simd.load8(builder, bp, ir.Constant(simd.I64, 0))
            add, sub = builder.fadd, builder.fsub
            s_ = [add(add(mv[j], mv[4 + j]), mv[8 + j]) for j in range(4)]
            u = [sub(sub(mv[4 + j], mv[8 + j]), mv[12 + j]) for j in range(4)]
            ys = (
                add(add(add(s_[0], s_[1]), s_[2]), bk),
                add(sub(sub(s_[1], s_[2]), s_[3]), bk),
                add(add(add(u[0], u[1]), u[2]), bk),
                add(sub(sub(u[1], u[2]), u[3]), bk),
            )
            for y, (i, j) in zip(ys, ((0, 0), (0, 1), (1, 0), (1, 1)), strict=True):
                value = y
                if relu:  # NaN stays NaN, as in the im2col path
                    low = builder.fcmp_ordered("<=", y, simd.ZERO)
                    value = builder.select(low, simd.ZERO, y)
                off = builder.add(simd.times(builder, i, rs), simd.times(builder, j, cs))
                simd.store8(builder, value, dp, off)
            return context.get_dummy_value()

        return sig, codegen

    return tile_out8


_tile_out8 = _tile_out8_kernel(relu=False)
_tile_out8_relu = _tile_out8_kernel(relu=True)


@njit(nogil=True, cache=True)
def _input_transform8(x, xm, masked, ph, pw, TH, TW, xh, V, SV, t0):
    """_input_transform for C % 8 == 0, through xh (2*TH + 2, 2*TW + 2, C): the padded sample
    channels-last (border zeroed by the caller), filled by 8x8 transposes."""
    C, H, W = x.shape
    W8 = W - W % 8
    WP = xh.shape[1]
    xa, ma, ha = x.ctypes.data, xm.ctypes.data, xh.ctypes.data
    for h in range(H):
        for c0 in range(0, C, 8):
            for w0 in range(0, W8, 8):
                src = ((c0 * H + h) * W + w0) * 4
                dst = ha + (((h + ph) * WP + pw + w0) * C + c0) * 4
                if masked:
                    transpose8_masked(xa + src, H * W, ma + src, dst, C)
                else:
                    transpose8(xa + src, H * W, xa + src, dst, C)
        for w in range(W8, W):
            for c in range(C):
                v = x[c, h, w]
                if masked and not xm[c, h, w] > 0:
                    v = 0
                xh[h + ph, pw + w, c] = v
    va = V.ctypes.data
    for th in range(TH):
        for tw in range(TW):
            corner = ha + (2 * th * WP + 2 * tw) * C * 4
            t = (t0 + th * TW + tw) * C
            for c0 in range(0, C, 8):
                _tile_in8(corner + c0 * 4, WP * C, C, va + (t + c0) * 4, SV)


@njit(nogil=True, cache=True)
def _output_transform8(M, SM, t0, bias, relu, TW, out, oh):
    """_output_transform for K % 8 == 0, through oh (2*TH, 2*TW, K): the outputs channels-last,
    then 8x8 transposes into out (K, OH, OW)."""
    K, OH, OW = out.shape
    TH = (OH + 1) // 2
    OWp = oh.shape[1]
    ma, ba, ha, oa = M.ctypes.data, bias.ctypes.data, oh.ctypes.data, out.ctypes.data
    for th in range(TH):
        for tw in range(TW):
            t = t0 + th * TW + tw
            dst = ha + (2 * th * OWp + 2 * tw) * K * 4
            for k0 in range(0, K, 8):
                src, b = ma + (t * K + k0) * 4, ba + k0 * 4
                if relu:
                    _tile_out8_relu(src, SM, b, dst + k0 * 4, OWp * K, K)
                else:
                    _tile_out8(src, SM, b, dst + k0 * 4, OWp * K, K)
    OW8 = OW - OW % 8
    for r in range(OH):
        for k0 in range(0, K, 8):
            for w0 in range(0, OW8, 8):
                src = ha + ((r * OWp + w0) * K + k0) * 4
                transpose8(src, K, src, oa + ((k0 * OH + r) * OW + w0) * 4, OH * OW)
        for w in range(OW8, OW):
            for k in range(K):
                out[k, r, w] = oh[r, w, k]


@njit(nogil=True, cache=True)
def _forward_range(x, xm, masked, U, K, bias, ph, pw, relu, out, lo, hi, nb, xp, V, M, oh, fast,
                   vec):  # fmt: skip
    C = x.shape[1]
    SU = K * C + PAD
    OH, OW = out.shape[2], out.shape[3]
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    per = TH * TW
    xp[:] = 0
    n = lo
    while n < hi:
        m = min(nb, hi - n)
        T = m * per
        SV, SM = C * T + PAD, K * T + PAD
        for i in range(m):
            if vec:  # xp is channels-last here, see conv3x3_forward
                _input_transform8(x[n + i], xm[n + i], masked, ph, pw, TH, TW, xp, V, SV, i * per)
            else:
                _input_transform(x[n + i], xm[n + i], masked, ph, pw, TH, TW, xp, V, SV, i * per)
        for e in range(16):
            Ve = V[e * SV : e * SV + T * C].reshape(T, C)
            Ue = U[e * SU : e * SU + C * K].reshape(C, K)
            Me = M[e * SM : e * SM + T * K].reshape(T, K)
            if fast:
                gemm(Ve, Ue, Me)
            else:
                np.dot(Ve, Ue, Me)
        for i in range(m):
            if vec:
                _output_transform8(M, SM, i * per, bias, relu, TW, out[n + i], oh)
            else:
                _output_transform(M, SM, i * per, bias, relu, TW, out[n + i])
        n += m


@njit(nogil=True, cache=True, parallel=True)
def _forward_parallel(x, xm, masked, U, K, bias, ph, pw, relu, out, T, nb, xp, V, M, oh, fast,
                      vec):  # fmt: skip
    N = x.shape[0]
    for t in prange(T):
        _forward_range(x, xm, masked, U, K, bias, ph, pw, relu, out, t * N // T,
                       (t + 1) * N // T, nb, xp[t], V[t], M[t], oh[t], fast, vec)  # fmt: skip


@njit(nogil=True, cache=True)
def _forward_serial(x, xm, masked, U, K, bias, ph, pw, relu, out, nb, xp, V, M, oh, fast, vec):
    _forward_range(x, xm, masked, U, K, bias, ph, pw, relu, out, 0, x.shape[0], nb, xp[0], V[0],
                   M[0], oh[0], fast, vec)  # fmt: skip


def conv3x3_forward(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    padding: tuple[int, int],
    relu: bool,
    out: np.ndarray,
    ws: Workspace,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """out = conv2d(x, w, b) with stride 1 (and ReLU), for w (K, C, 3, 3); x contiguous. With
    ``mask`` (x's shape), x counts as 0 where mask <= 0: dL/dx of a conv + ReLU passes dY and
    the layer's output (see conv.py), and the masking happens as the input is padded."""
    N, C = x.shape[:2]
    K = w.shape[0]
    ph, pw = padding
    OH, OW = out.shape[2], out.shape[3]
    # The loops index by these shapes without bounds checks: refuse what does not chain.
    if w.shape != (K, C, 3, 3) or out.shape != (
        N,
        K,
        x.shape[2] + 2 * ph - 2,
        x.shape[3] + 2 * pw - 2,
    ):
        raise ValueError(f"conv3x3_forward: x {x.shape}, w {w.shape} and out {out.shape} "
                         f"do not match (padding {padding})")  # fmt: skip
    if N == 0 or OH == 0 or OW == 0:
        return out
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    T = max(1, min(numba.get_num_threads(), N))
    per_thread = -(-N // T)
    nb = max(1, min(per_thread, BLOCK_BUDGET // (16 * max(C, K) * TH * TW)))
    tiles = nb * TH * TW
    U = ws.get("wino_u", (16 * (C * K + PAD),), x.dtype)
    _kernel_transform(w, U, K * C + PAD)
    # The padded sample: tiles read up to row 2*TH + 1 and column 2*TW + 1, which is at least
    # H + 2*ph - 1 (OH = H + 2*ph - 2).
    fast = x.dtype == np.float32 and K % 8 == 0  # what gemm.py needs of every product here
    vec = fast and C % 8 == 0 and out.flags.c_contiguous  # the 8-channel transforms
    if vec:  # channels-last padded sample, and the outputs before their transpose
        xp = ws.get("wino_xh", (T, 2 * TH + 2, 2 * TW + 2, C), x.dtype)
        oh = ws.get("wino_oh", (T, 2 * TH, 2 * TW, K), x.dtype)
    else:
        xp = ws.get("wino_xp", (T, C, 2 * TH + 2, 2 * TW + 2), x.dtype)
        oh = ws.get("wino_oh", (T, 1, 1, 1), x.dtype)
    b = np.ascontiguousarray(b, dtype=x.dtype)
    V = ws.get("wino_v", (T, 16 * (C * tiles + PAD)), x.dtype)
    M = ws.get("wino_m", (T, 16 * (K * tiles + PAD)), x.dtype)
    masked = mask is not None
    if masked and mask.shape != x.shape:
        raise ValueError(f"conv3x3_forward: mask {mask.shape} is not the shape of x {x.shape}")
    xm = np.ascontiguousarray(mask) if masked else x
    args = (x, xm, masked, U, K, b, ph, pw, relu, out)
    if T == 1:
        _forward_serial(*args, nb, xp, V, M, oh, fast, vec)
    else:
        _forward_parallel(*args, T, nb, xp, V, M, oh, fast, vec)
    return out
