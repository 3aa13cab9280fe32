"""A float32 GEMM for the small, skinny products of the convolutions: C = A @ B.

OpenBLAS, held to one thread per worker (``_runtime``), reaches 45-80 GFLOP/s on many of the
shapes im2col and Winograd produce here (8 to 64 output channels, inner dimensions of 27 to
576), against 94 on a square 1024 product: it packs both operands for every call, and its blocking
suits large matrices. This kernel packs nothing. A register block of 6 rows x 16 columns of C
lives in twelve 8-wide vector registers while the inner dimension runs: per step, two vector
loads of B, six broadcasts of A and twelve fused multiply-adds, which keeps both FMA pipes of
an AVX2 core busy (measured 85-92 GFLOP/s on one thread for (1024 x 32) @ (32 x 32), where
OpenBLAS gives 70).

Numba cannot express that register block (it has no vector types and keeps arrays in memory),
so the block is written in LLVM IR with ``numba.extending.intrinsic``: vector loads, a splat of
each A value and ``llvm.fma.v8f32``. Everything around it (panels, edges, the choice to use it)
is ordinary Numba.

A may be any strided view (im2col's ``col.T``, a transposed weight matrix); B and C must have
unit stride along their rows, and N must be a multiple of 8 (``gemm`` checks shapes, strides
and the float32 type before any address is used). The callers choose it where
it measured faster and fall back to ``np.dot`` otherwise (float64, odd widths, the im2col
forward of 64-channel layers, where OpenBLAS ran 77 GFLOP/s against 66-68 here). On
Winograd's products, (tiles x C) @ (C x K), it ran 87-88 GFLOP/s for 32 and 64 channels
against OpenBLAS's 70-77 in the same orientation. Each element of
C is a sum in a fixed order (FMA chains over the inner dimension, in chunks of ``KC``), so the
results are deterministic; they differ from BLAS's in the last bits.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from cnnd.core.kernels import simd

MR = 6  # rows of C per register block
KC = 256  # inner-dimension chunk: a 256 x 16 panel of B (16 KiB) stays in L1
MC = 96  # rows of A per panel (96 x 256 floats, 96 KiB, in L2) reused across all of B


def _block_kernel(rows: int, vecs: int):
    """An intrinsic computing C[rows, 8*vecs] (+)= A[rows, :kd] @ B[:kd, 8*vecs]."""

    @intrinsic
    def kernel(typingctx, a, a_rs, a_ks, b, ldb, c, ldc, kd, accumulate):
        sig = types.void(types.uintp, types.intp, types.intp, types.uintp, types.intp,
                         types.uintp, types.intp, types.intp, types.boolean)  # fmt: skip

        def codegen(context, builder, signature, args):
            a_addr, a_rs, a_ks, b_addr, ldb, c_addr, ldc, kd, accumulate = args
            i32, i64, vec, zero = simd.I32, simd.I64, simd.VEC, simd.ZERO
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v8f32"
            )
            a_ptr = simd.pointer(builder, a_addr)
            b_ptr = simd.pointer(builder, b_addr)
            c_ptr = simd.pointer(builder, c_addr)
            undef = ir.Constant(vec, ir.Undefined)
            splat_mask = ir.Constant(ir.VectorType(i32, 8), [0] * 8)

            entry = builder.block
            loop = builder.append_basic_block("block.loop")
            done = builder.append_basic_block("block.done")
            builder.cbranch(builder.icmp_signed(">", kd, ir.Constant(i64, 0)), loop, done)

            # The loop over the inner dimension, accumulators as phi nodes (registers).
            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(ir.Constant(i64, 0), entry)
            acc = [[builder.phi(vec) for _ in range(vecs)] for _ in range(rows)]
            for row in acc:
                for phi in row:
                    phi.add_incoming(zero, entry)
            b_row = builder.gep(b_ptr, [builder.mul(k, ldb)])
            b_vecs = [simd.load8(builder, b_row, ir.Constant(i64, 8 * v)) for v in range(vecs)]
            a_k = builder.mul(k, a_ks)
            new = []
            for r in range(rows):
                a_off = builder.add(builder.mul(ir.Constant(i64, r), a_rs), a_k)
                a_val = builder.load(builder.gep(a_ptr, [a_off]))
                one = builder.insert_element(undef, a_val, ir.Constant(i32, 0))
                splat = builder.shuffle_vector(one, undef, splat_mask)
                new.append([builder.call(fma, [splat, b_vecs[v], acc[r][v]]) for v in range(vecs)])
            k_next = builder.add(k, ir.Constant(i64, 1))
            tail = builder.block
            k.add_incoming(k_next, tail)
            for r in range(rows):
                for v in range(vecs):
                    acc[r][v].add_incoming(new[r][v], tail)
            builder.cbranch(builder.icmp_signed("<", k_next, kd), loop, done)

            # Write the block: C = acc, or C += acc.
            builder.position_at_end(done)
            totals = []  # phi nodes first: they must head the block
            for r in range(rows):
                totals.append([])
                for v in range(vecs):
                    total = builder.phi(vec)
                    total.add_incoming(zero, entry)
                    total.add_incoming(new[r][v], tail)
                    totals[r].append(total)
            for r in range(rows):
                c_row = builder.gep(c_ptr, [builder.mul(ir.Constant(i64, r), ldc)])
                for v in range(vecs):
                    total, off = totals[r][v], ir.Constant(i64, 8 * v)
                    with builder.if_else(accumulate) as (then, otherwise):
                        with then:
                            old = simd.load8(builder, c_row, off)
                            simd.store8(builder, builder.fadd(old, total), c_row, off)
                        with otherwise:
                            simd.store8(builder, total, c_row, off)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


_k6x16 = _block_kernel(MR, 2)
_k1x16 = _block_kernel(1, 2)
_k6x8 = _block_kernel(MR, 1)
_k1x8 = _block_kernel(1, 1)


@njit(nogil=True, cache=True)
def gemm(a, b, c, accumulate=False):
    """c (M, N) = a (M, K) @ b (K, N), or c += a @ b: float32, b and c with unit stride along
    their rows, N a multiple of 8 (checked: ValueError otherwise)."""
    M, K = a.shape
    N = b.shape[1]
    # The block kernels take raw addresses: shapes are checked here, not trusted.
    if a.itemsize != 4 or b.itemsize != 4 or c.itemsize != 4:
        raise ValueError("gemm: float32 operands only")
    if b.shape[0] != K or c.shape[0] != M or c.shape[1] != N or N % 8 != 0:
        raise ValueError("gemm: shapes do not chain, or the width is not a multiple of 8")
    if (M > 0 and N > 0 and c.strides[1] != 4) or (K > 0 and N > 0 and b.strides[1] != 4):
        raise ValueError("gemm: b and c need unit stride along their rows")
    a0, b0, c0 = a.ctypes.data, b.ctypes.data, c.ctypes.data
    a_rs, a_ks = a.strides[0] // 4, a.strides[1] // 4
    ldb, ldc = b.strides[0] // 4, c.strides[0] // 4
    if K == 0 and not accumulate:
        c[:] = 0
    for k0 in range(0, K, KC):
        kc = min(KC, K - k0)
        acc = accumulate or k0 > 0
        for i0 in range(0, M, MC):
            i1 = min(M, i0 + MC)
            for j in range(0, N, 16):
                wide = j + 16 <= N
                bj = b0 + (k0 * ldb + j) * 4
                i = i0
                while i < i1:
                    ai = a0 + (i * a_rs + k0 * a_ks) * 4
                    cij = c0 + (i * ldc + j) * 4
                    if i + MR <= i1:
                        if wide:
                            _k6x16(ai, a_rs, a_ks, bj, ldb, cij, ldc, kc, acc)
                        else:
                            _k6x8(ai, a_rs, a_ks, bj, ldb, cij, ldc, kc, acc)
                        i += MR
                    else:
                        if wide:
                            _k1x16(ai, a_rs, a_ks, bj, ldb, cij, ldc, kc, acc)
                        else:
                            _k1x8(ai, a_rs, a_ks, bj, ldb, cij, ldc, kc, acc)
                        i += 1
