"""Element loops that Numba turns into SIMD code, for the copies and sums of the kernels.

Numba compiles a slice assignment (``a[i:j] = b[k:l]``, ``a[i:j] += ...``) to a generic
strided loop, and an element access at a computed offset (``a[s + c]``) to one that also
handles negative indices; neither vectorises. These loops index fresh views with the loop
counter alone, which LLVM turns into SIMD: measured on CIFAR-type layers, im2col 2-2.5x and
col2im 3-4x faster, with the same results to the bit.
"""

from __future__ import annotations

from numba import njit


@njit(nogil=True, cache=True)
def copy_into(dst, src):
    """dst[:] = src (same length)."""
    for j in range(dst.shape[0]):
        dst[j] = src[j]


@njit(nogil=True, cache=True)
def add_into(dst, src):
    """dst[:] += src (same length)."""
    for j in range(dst.shape[0]):
        dst[j] += src[j]


@njit(nogil=True, cache=True)
def fill_zero(dst):
    for j in range(dst.shape[0]):
        dst[j] = 0


@njit(nogil=True, cache=True)
def relu_mask_into(dst, src, y):
    """dst[:] = src where y > 0, else 0: the fused ReLU's derivative (a select, not a branch)."""
    for j in range(dst.shape[0]):
        dst[j] = src[j] if y[j] > 0 else 0
