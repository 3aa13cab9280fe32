"""8-wide float32 vector pieces written in LLVM IR, for the loops Numba cannot vectorise.

Numba has no vector types, and LLVM will not vectorise a loop that stores to many planes of
one array or transposes (it cannot prove the stores independent, and strided accesses do not
pack into vectors). The intrinsics here (``numba.extending.intrinsic``) take raw addresses
and do exactly 8-wide loads, shuffles and stores; their callers check shapes first and pass
addresses inside C-contiguous float32 arrays.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

F32 = ir.FloatType()
I32 = ir.IntType(32)
I64 = ir.IntType(64)
VEC = ir.VectorType(F32, 8)
ZERO = ir.Constant(VEC, [0.0] * 8)


def pointer(builder: ir.IRBuilder, address: ir.Value) -> ir.Value:
    return builder.inttoptr(address, F32.as_pointer())


def load8(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value) -> ir.Value:
    """The 8 floats at base + offset (in floats), unaligned."""
    ptr = builder.bitcast(builder.gep(base, [offset]), VEC.as_pointer())
    value = builder.load(ptr)
    value.align = 4
    return value


def store8(builder: ir.IRBuilder, value: ir.Value, base: ir.Value, offset: ir.Value) -> None:
    ptr = builder.bitcast(builder.gep(base, [offset]), VEC.as_pointer())
    builder.store(value, ptr).align = 4


def times(builder: ir.IRBuilder, k: int, value: ir.Value) -> ir.Value:
    return builder.mul(ir.Constant(I64, k), value)


def _shuffle(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, lanes: list[int]) -> ir.Value:
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, 8), lanes))


def _transpose8(masked: bool):
    @intrinsic
    def transpose(typingctx, src, src_ld, mask, dst, dst_ld):
        sig = types.void(types.uintp, types.intp, types.uintp, types.uintp, types.intp)

        def codegen(context, builder, signature, args):
            src, src_ld, mask, dst, dst_ld = args
            s, m, d = pointer(builder, src), pointer(builder, mask), pointer(builder, dst)
            rows = []
            for i in range(8):
                row = load8(builder, s, times(builder, i, src_ld))
                if masked:  # the fused ReLU's derivative: 0 where the mask is not > 0
                    keep = builder.fcmp_ordered(">", load8(builder, m, times(builder, i, src_ld)),
                                                ZERO)  # fmt: skip
                    row = builder.select(keep, row, ZERO)
                rows.append(row)
            # Three rounds of two-input shuffles, as the classic AVX 8x8 transpose.
            lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
            t = []
            for i in range(0, 8, 2):
                t += [_shuffle(builder, rows[i], rows[i + 1], lo),
                      _shuffle(builder, rows[i], rows[i + 1], hi)]  # fmt: skip
            a, b = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
            s4 = []
            for p, q in ((0, 2), (1, 3), (4, 6), (5, 7)):
                s4 += [_shuffle(builder, t[p], t[q], a), _shuffle(builder, t[p], t[q], b)]
            low, high = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
            for j in range(4):
                store8(builder, _shuffle(builder, s4[j], s4[4 + j], low), d,
                       times(builder, j, dst_ld))  # fmt: skip
                store8(builder, _shuffle(builder, s4[j], s4[4 + j], high), d,
                       times(builder, 4 + j, dst_ld))  # fmt: skip
            return context.get_dummy_value()

        return sig, codegen

    return transpose


# dst[j*dst_ld + i] = src[i*src_ld + j] for i, j < 8 (addresses of float32 data, strides in
# floats); the masked one writes 0 where mask[i*src_ld + j] is not > 0.
transpose8 = _transpose8(masked=False)
transpose8_masked = _transpose8(masked=True)
