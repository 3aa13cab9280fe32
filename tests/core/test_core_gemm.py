"""The register-blocked float32 GEMM (core/kernels/gemm.py) against np.dot in float64: every
edge of its blocking (rows not a multiple of 6, widths of 8 and 16 columns, inner dimensions
across the 256-chunk boundary, empty ones), strided and transposed left operands, row strides
wider than the rows, and accumulation into C."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from cnnd.core.kernels import gemm as g


@njit(cache=False)
def _gemm_transposed(a_t: np.ndarray, b: np.ndarray, c: np.ndarray, accumulate: bool) -> None:
    g.gemm(a_t.T, b, c, accumulate)  # a as a column-major view, as im2col's col.T


def _ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.float64) @ b.astype(np.float64)


def _check(got: np.ndarray, want: np.ndarray, k: int) -> None:
    # float32 sums of k products: error ~ k * eps * sum|a||b|; the data are O(1).
    scale = max(np.abs(want).max(initial=0.0), 1.0) * max(k, 1)
    assert np.abs(got - want).max(initial=0.0) <= 4e-7 * scale


@settings(max_examples=60, deadline=None)
@given(
    m=st.one_of(st.integers(1, 40), st.integers(90, 200)),  # several 96-row panels too
    k=st.sampled_from([0, 1, 5, 27, 255, 256, 257, 600]),
    n=st.sampled_from([8, 16, 24, 32, 40, 64]),
    transposed=st.booleans(),
    accumulate=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_gemm_matches_float64_product(
    m: int, k: int, n: int, transposed: bool, accumulate: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    c = c0.copy()
    if transposed:
        _gemm_transposed(np.ascontiguousarray(a.T), b, c, accumulate)
    else:
        g.gemm(a, b, c, accumulate)
    want = _ref(a, b) + (c0 if accumulate else 0)
    _check(c, want, k)


def test_gemm_on_views_with_wide_row_strides() -> None:
    """B and C as column slices of wider arrays (row stride > width), A a strided view."""
    rng = np.random.default_rng(1)
    big_a = rng.standard_normal((50, 70)).astype(np.float32)
    big_b = rng.standard_normal((35, 48)).astype(np.float32)
    big_c = np.zeros((25, 40), np.float32)
    a, b, c = big_a[::2, 3:38], big_b[:, 8:32], big_c[:, 8:32]
    g.gemm(a, b, c)
    _check(c, _ref(a, b), 35)
    assert not big_c[:, :8].any() and not big_c[:, 32:].any()  # nothing outside C written


def test_gemm_is_deterministic() -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal((97, 300)).astype(np.float32)
    b = rng.standard_normal((300, 48)).astype(np.float32)
    first = np.empty((97, 48), np.float32)
    g.gemm(a, b, first)
    for _ in range(3):
        again = np.empty_like(first)
        g.gemm(a, b, again)
        np.testing.assert_array_equal(again, first)


F32 = np.float32


def test_gemm_checks_shapes_before_writing() -> None:
    """The block kernels write through raw addresses: a product that does not chain, or a
    width the kernels cannot cover, is an error, not a write past C."""
    a = np.zeros((4, 3), F32)
    with pytest.raises(ValueError, match="shapes"):
        g.gemm(a, np.zeros((5, 8), F32), np.zeros((4, 8), F32))
    with pytest.raises(ValueError, match="shapes"):
        g.gemm(a, np.zeros((3, 16), F32), np.zeros((4, 8), F32))
    with pytest.raises(ValueError, match="shapes"):
        g.gemm(a, np.zeros((3, 12), F32), np.zeros((4, 12), F32))
    with pytest.raises(ValueError, match="unit stride"):
        g.gemm(a, np.zeros((3, 8), F32), np.zeros((4, 16), F32)[:, ::2])
    with pytest.raises(ValueError, match="unit stride"):
        g.gemm(a, np.zeros((3, 16), F32)[:, ::2], np.zeros((4, 8), F32))
    with pytest.raises(ValueError, match="float32"):
        g.gemm(np.zeros((4, 3)), np.zeros((3, 8)), np.zeros((4, 8)))
