"""Every Numba kernel against its plain-NumPy loop reference (cnnd.core.reference).

Shapes, strides and paddings are drawn by hypothesis. float64 results must agree to ~1e-10;
float32 kernels are compared with the float64 reference of the same inputs, more loosely.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnd.core import kernels
from cnnd.core import reference as ref
from cnnd.core.kernels.activations import PARALLEL_MIN
from cnnd.core.kernels.dense import PARALLEL_MIN_MACS

DTYPES = [np.float64, np.float32]
TOL = {np.float64: {"rtol": 1e-10, "atol": 1e-10}, np.float32: {"rtol": 1e-4, "atol": 1e-5}}
# float32 sums over many products (conv weight gradients) get a slightly larger atol.
TOL_SUM = {np.float64: {"rtol": 1e-10, "atol": 1e-10}, np.float32: {"rtol": 1e-4, "atol": 1e-4}}

SETTINGS = settings(max_examples=40, deadline=None)

Pair = int | tuple[int, int]


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


def int_or_pair(lo: int, hi: int) -> st.SearchStrategy[Pair]:
    """An int or a (h, w) tuple of ints in [lo, hi], as the kernels accept."""
    return st.one_of(st.integers(lo, hi), st.tuples(st.integers(lo, hi), st.integers(lo, hi)))


def _randn(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _close(actual: np.ndarray, desired: np.ndarray, dtype: Any, tol: dict | None = None) -> None:
    assert actual.dtype == np.dtype(dtype)
    assert actual.shape == desired.shape
    np.testing.assert_allclose(actual, desired, **(tol or TOL)[dtype])


@st.composite
def conv_cases(draw: st.DrawFn) -> dict[str, Any]:
    """A convolution geometry whose padded input holds at least one window."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(int_or_pair(1, 3))
    padding = draw(int_or_pair(0, 2))
    ph, pw = _pair(padding)
    return {
        "n": draw(st.integers(1, 5)),  # more samples than threads: exercises the thread split
        "c": draw(st.integers(1, 3)),
        # 8 and 16 kernels: float32 products then run on gemm.py's kernel (K % 8 == 0).
        "k": draw(st.sampled_from([1, 2, 3, 4, 8, 16])),
        "kh": kh,
        "kw": kw,
        "h": draw(st.integers(max(1, kh - 2 * ph), 9)),
        "w": draw(st.integers(max(1, kw - 2 * pw), 9)),
        "stride": stride,
        "padding": padding,
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@st.composite
def pool_cases(draw: st.DrawFn) -> dict[str, Any]:
    """A pooling geometry with PyTorch's constraint padding <= kernel / 2."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph = draw(st.integers(0, kh // 2))
    pw = draw(st.integers(0, kw // 2))
    padding: Pair = ph if ph == pw and draw(st.booleans()) else (ph, pw)
    stride = draw(st.one_of(st.none(), int_or_pair(1, 3)))
    return {
        "n": draw(st.integers(1, 3)),
        "c": draw(st.integers(1, 3)),
        "h": draw(st.integers(max(1, kh - 2 * ph), 9)),
        "w": draw(st.integers(max(1, kw - 2 * pw), 9)),
        "kernel": kh if kh == kw and draw(st.booleans()) else (kh, kw),
        "stride": stride,
        "padding": padding,
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=conv_cases())
def test_conv2d_forward_matches_reference(dtype: Any, case: dict[str, Any]) -> None:
    """conv2d_forward (plain and with fused ReLU) equals the loop reference."""
    rng = np.random.default_rng(case["seed"])
    x = _randn(rng, (case["n"], case["c"], case["h"], case["w"]), dtype)
    w = _randn(rng, (case["k"], case["c"], case["kh"], case["kw"]), dtype)
    b = _randn(rng, (case["k"],), dtype) if case["bias"] else None
    s, p = case["stride"], case["padding"]
    expected = ref.conv2d_forward(x.astype(np.float64), w.astype(np.float64), b, s, p)
    _close(kernels.conv2d_forward(x, w, b, s, p), expected, dtype)
    _close(kernels.conv2d_forward(x, w, b, s, p, relu=True), np.maximum(expected, 0), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=conv_cases())
def test_conv2d_backward_matches_reference(dtype: Any, case: dict[str, Any]) -> None:
    """conv2d_backward's dx, dw and db equal the reference's full-convolution formulas."""
    rng = np.random.default_rng(case["seed"])
    x = _randn(rng, (case["n"], case["c"], case["h"], case["w"]), dtype)
    w = _randn(rng, (case["k"], case["c"], case["kh"], case["kw"]), dtype)
    s, p = case["stride"], case["padding"]
    out_shape = kernels.conv2d_forward(x, w, None, s, p).shape
    dout = _randn(rng, out_shape, dtype)
    rdx, rdw, rdb = ref.conv2d_backward(
        dout.astype(np.float64), x.astype(np.float64), w.astype(np.float64), s, p
    )
    dx, dw, db = kernels.conv2d_backward(dout, x, w, s, p)
    assert dx is not None
    _close(dx, rdx, dtype, TOL_SUM)
    _close(dw, rdw, dtype, TOL_SUM)
    _close(db, rdb, dtype, TOL_SUM)
    no_dx, dw2, db2 = kernels.conv2d_backward(dout, x, w, s, p, need_dx=False)
    assert no_dx is None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=pool_cases(), ties=st.booleans())
def test_maxpool2d_matches_reference(dtype: Any, case: dict[str, Any], ties: bool) -> None:
    """maxpool2d forward and backward equal the reference, including which of tied maxima
    receives the gradient (the first in row-major window order) and -inf padding."""
    rng = np.random.default_rng(case["seed"])
    shape = (case["n"], case["c"], case["h"], case["w"])
    # With ties the values are drawn from {-1, 0, 1}: many windows hold repeated maxima.
    x = rng.integers(-1, 2, shape).astype(dtype) if ties else _randn(rng, shape, dtype)
    k, s, p = case["kernel"], case["stride"], case["padding"]
    y, argmax = kernels.maxpool2d_forward(x, k, s, p)
    _close(y, ref.maxpool2d_forward(x, k, s, p), dtype)
    dout = _randn(rng, y.shape, dtype)
    dx = kernels.maxpool2d_backward(dout, argmax, x.shape)
    _close(dx, ref.maxpool2d_backward(dout.astype(np.float64), x, k, s, p), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=pool_cases())
def test_avgpool2d_matches_reference(dtype: Any, case: dict[str, Any]) -> None:
    """avgpool2d forward and backward equal the reference (padding counts in the divisor)."""
    rng = np.random.default_rng(case["seed"])
    x = _randn(rng, (case["n"], case["c"], case["h"], case["w"]), dtype)
    k, s, p = case["kernel"], case["stride"], case["padding"]
    y = kernels.avgpool2d_forward(x, k, s, p)
    _close(y, ref.avgpool2d_forward(x.astype(np.float64), k, s, p), dtype)
    dout = _randn(rng, y.shape, dtype)
    dx = kernels.avgpool2d_backward(dout, x.shape, k, s, p)
    _close(dx, ref.avgpool2d_backward(dout.astype(np.float64), x, k, s, p), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(
    n=st.integers(1, 7),
    f=st.integers(1, 12),
    o=st.integers(1, 6),
    bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_linear_matches_reference(
    dtype: Any, n: int, f: int, o: int, bias: bool, seed: int
) -> None:
    """linear forward (plain and fused ReLU) and backward equal the reference."""
    rng = np.random.default_rng(seed)
    x, w = _randn(rng, (n, f), dtype), _randn(rng, (o, f), dtype)
    b = _randn(rng, (o,), dtype) if bias else None
    expected = ref.linear_forward(x.astype(np.float64), w.astype(np.float64), b)
    _close(kernels.linear_forward(x, w, b), expected, dtype)
    _close(kernels.linear_forward(x, w, b, relu=True), np.maximum(expected, 0), dtype)
    dout = _randn(rng, (n, o), dtype)
    rdx, rdw, rdb = ref.linear_backward(
        dout.astype(np.float64), x.astype(np.float64), w.astype(np.float64)
    )
    dx, dw, db = kernels.linear_backward(dout, x, w)
    assert dx is not None
    _close(dx, rdx, dtype)
    _close(dw, rdw, dtype)
    _close(db, rdb, dtype)
    no_dx, dw2, _ = kernels.linear_backward(dout, x, w, need_dx=False)
    assert no_dx is None
    np.testing.assert_array_equal(dw2, dw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "f", "o"), [(64, 300, 10), (3, 500, 700), (180, 257, 3)])
def test_linear_parallel_backward_matches_reference(dtype: Any, n: int, f: int, o: int) -> None:
    """Above PARALLEL_MIN_MACS the backward splits dW by rows and dx by samples over threads
    (some with a single row or sample); with the fused ReLU's mask it equals the reference."""
    assert n * f * o >= PARALLEL_MIN_MACS
    rng = np.random.default_rng(n + f + o)
    x, w, b = _randn(rng, (n, f), dtype), _randn(rng, (o, f), dtype), _randn(rng, (o,), dtype)
    y = kernels.linear_forward(x, w, b, relu=True)
    dout = _randn(rng, (n, o), dtype)
    masked = np.where(y > 0, dout, 0).astype(np.float64)
    rdx, rdw, rdb = ref.linear_backward(masked, x.astype(np.float64), w.astype(np.float64))
    dx, dw, db = kernels.linear_backward(dout, x, w, need_dx=True, y=y)
    assert dx is not None
    _close(dx, rdx, dtype, TOL_SUM)
    _close(dw, rdw, dtype, TOL_SUM)
    _close(db, rdb, dtype, TOL_SUM)


def _check_activations(x: np.ndarray, dout: np.ndarray, dtype: Any, slope: float) -> None:
    x64, d64 = x.astype(np.float64), dout.astype(np.float64)
    y = kernels.relu_forward(x)
    _close(y, ref.relu_forward(x64), dtype)
    _close(kernels.relu_backward(dout, y), ref.relu_backward(d64, x64), dtype)
    _close(kernels.leaky_relu_forward(x, slope), ref.leaky_relu_forward(x64, slope), dtype)
    _close(
        kernels.leaky_relu_backward(dout, x, slope), ref.leaky_relu_backward(d64, x64, slope), dtype
    )
    y = kernels.tanh_forward(x)
    _close(y, ref.tanh_forward(x64), dtype)
    _close(kernels.tanh_backward(dout, y), ref.tanh_backward(d64, x64), dtype)
    y = kernels.sigmoid_forward(x)
    _close(y, ref.sigmoid_forward(x64), dtype)
    _close(kernels.sigmoid_backward(dout, y), ref.sigmoid_backward(d64, x64), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
    scale=st.sampled_from([0.1, 1.0, 8.0]),
    slope=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**32 - 1),
)
def test_activations_match_reference(
    dtype: Any, shape: tuple[int, ...], scale: float, slope: float, seed: int
) -> None:
    """relu, leaky_relu, tanh and sigmoid, forward and backward, equal the reference on arrays
    of any rank (the serial kernels)."""
    rng = np.random.default_rng(seed)
    _check_activations(
        _randn(rng, shape, dtype) * dtype(scale), _randn(rng, shape, dtype), dtype, slope
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_parallel_path_matches_reference(dtype: Any, rng: np.random.Generator) -> None:
    """Arrays of PARALLEL_MIN elements or more take the prange kernels; they agree too."""
    shape = (3, 5, 70, 67)
    assert np.prod(shape) >= PARALLEL_MIN
    _check_activations(_randn(rng, shape, dtype) * 3, _randn(rng, shape, dtype), dtype, 0.2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_saturates_without_overflow(dtype: Any) -> None:
    """sigmoid of large |x| is exactly 0 or 1 and never NaN (two-branch formula)."""
    x = np.array([-1e4, -800.0, -50.0, 0.0, 50.0, 800.0, 1e4], dtype=dtype)
    y = kernels.sigmoid_forward(x)
    assert np.isfinite(y).all()
    assert y[0] == 0 and y[-1] == 1 and y[3] == 0.5


@pytest.mark.parametrize("size", [1000, PARALLEL_MIN + 10])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_kernels_are_mask_products(dtype: Any, size: int, rng: np.random.Generator) -> None:
    """dropout_mask is 0 or 1/(1-p) with E[mask] ~ 1; forward and backward multiply by it."""
    p = 0.3
    mask = kernels.dropout_mask((size,), p, np.random.default_rng(1), dtype)
    assert mask.dtype == np.dtype(dtype)
    assert set(np.unique(mask)) <= {dtype(0), dtype(1 / (1 - p))}
    assert abs((mask == 0).mean() - p) < 5 * np.sqrt(p * (1 - p) / size)
    x, dout = _randn(rng, (size,), dtype), _randn(rng, (size,), dtype)
    np.testing.assert_array_equal(kernels.dropout_forward(x, mask), x * mask)
    np.testing.assert_array_equal(kernels.dropout_backward(dout, mask), dout * mask)
    np.testing.assert_array_equal(
        kernels.dropout_mask((size,), p, np.random.default_rng(1), dtype), mask
    )


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(
    n=st.integers(1, 4),
    c=st.integers(1, 4),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    momentum=st.floats(0.0, 1.0),
    shift=st.sampled_from([0.0, 3.0, 100.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_batchnorm2d_training_forward_matches_reference(
    dtype: Any, n: int, c: int, h: int, w: int, momentum: float, shift: float, seed: int
) -> None:
    """Training-mode batchnorm2d equals the reference, and moves the running statistics as
    PyTorch does: (1 - m) * running + m * batch, with the unbiased variance."""
    if n * h * w == 1:
        n = 2  # one value per channel: zero variance and no unbiased estimate
    rng = np.random.default_rng(seed)
    x = (_randn(rng, (n, c, h, w), dtype) + dtype(shift)) * dtype(2)
    gamma, beta = _randn(rng, (c,), dtype), _randn(rng, (c,), dtype)
    running_mean = _randn(rng, (c,), np.float32)
    running_var = rng.uniform(0.5, 2, c).astype(np.float32)
    rm0, rv0 = running_mean.copy(), running_var.copy()
    eps = 1e-5
    y, _ = kernels.batchnorm2d_forward(
        x, gamma, beta, running_mean, running_var, eps, momentum, True
    )
    x64 = x.astype(np.float64)
    expected = ref.batchnorm2d_forward(x64, gamma.astype(np.float64), beta.astype(np.float64), eps)
    # A large common shift costs float32 inputs digits before normalisation amplifies them.
    _close(y, expected, dtype, None if shift < 100 else {dtype: {"rtol": 1e-3, "atol": 1e-3}})
    m = n * h * w
    mean = x64.mean(axis=(0, 2, 3))
    var = x64.var(axis=(0, 2, 3)) * m / (m - 1)
    np.testing.assert_allclose(running_mean, (1 - momentum) * rm0 + momentum * mean, rtol=1e-5)
    np.testing.assert_allclose(running_var, (1 - momentum) * rv0 + momentum * var, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(
    n=st.integers(1, 6),
    k=st.integers(2, 7),
    scale=st.sampled_from([0.1, 1.0, 20.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_softmax_cross_entropy_matches_reference(
    dtype: Any, n: int, k: int, scale: float, seed: int
) -> None:
    """Loss and dL/dlogits equal the reference; the correct-count is the arg-max hit count."""
    rng = np.random.default_rng(seed)
    logits = _randn(rng, (n, k), dtype) * dtype(scale)
    labels = rng.integers(0, k, n)
    loss, dlogits, correct = kernels.softmax_cross_entropy(logits, labels)
    rloss, rd = ref.softmax_cross_entropy(logits.astype(np.float64), labels)
    np.testing.assert_allclose(loss, rloss, **TOL[dtype])
    _close(dlogits, rd, dtype)
    assert correct == int((logits.argmax(axis=1) == labels).sum())
    onehot = np.eye(k)[labels]
    _close(kernels.softmax(logits), rd * n + onehot, dtype)


def test_softmax_cross_entropy_is_stable_for_huge_logits() -> None:
    """Logits of 1e4 do not overflow: the loss is the exact logsumexp difference."""
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4 - 2.0]], dtype=np.float32)
    loss, d, correct = kernels.softmax_cross_entropy(logits, np.array([0, 2]))
    assert np.isfinite(loss) and np.isfinite(d).all()
    np.testing.assert_allclose(loss, (0.0 + (2.0 + np.log1p(np.exp(-2.0)))) / 2, rtol=1e-6)
    assert correct == 1
    np.testing.assert_allclose(d.sum(axis=1), 0, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_propagates_nan_on_every_path(dtype: Any) -> None:
    """relu(NaN) is NaN (as in PyTorch), on the standalone kernels (serial and parallel) and
    in the ReLU fused into conv2d and linear: a NaN is never silently turned into 0."""
    x = np.array([np.nan, -1.0, 0.0, 2.0, -np.inf, np.inf], dtype=dtype)
    expected = np.array([np.nan, 0.0, 0.0, 2.0, 0.0, np.inf], dtype=dtype)
    np.testing.assert_array_equal(ref.relu_forward(x), expected)
    np.testing.assert_array_equal(kernels.relu_forward(x), expected)
    big = np.resize(x, PARALLEL_MIN + 6)
    np.testing.assert_array_equal(kernels.relu_forward(big), np.resize(expected, big.size))
    conv = kernels.conv2d_forward(
        x.reshape(1, 1, 1, 6), np.ones((1, 1, 1, 1), dtype), None, relu=True
    )
    np.testing.assert_array_equal(conv.ravel(), expected)
    lin = kernels.linear_forward(x.reshape(6, 1), np.ones((1, 1), dtype), None, relu=True)
    np.testing.assert_array_equal(lin.ravel(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kernel", "stride"), [(2, None), (3, 2), (2, 1)])
def test_maxpool_nan_wins_its_window(dtype: Any, kernel: int, stride: int | None) -> None:
    """A NaN in a window is its maximum, as in PyTorch, and the first NaN in row-major window
    order receives the gradient; windows without NaN are untouched. Covers the 2x2 stride-2
    fast path (a row holding a NaN is redone by the general loop) and the general loop, on
    planes large enough for the parallel driver."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 32, 12, 12)).astype(dtype)  # above pool.PARALLEL_MIN
    x[0, 0, 0, 1] = np.nan  # second cell of the first window
    x[0, 0, 1, 0] = np.nan  # third cell of the same window: the earlier NaN wins
    x[7, 31, 11, 11] = np.nan  # the last cell of the last plane
    x[1, 2, 4, 4:6] = np.inf
    y, argmax = kernels.maxpool2d_forward(x, kernel, stride)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref.maxpool2d_forward(x, kernel, stride)))
    finite = ~np.isnan(y)
    np.testing.assert_array_equal(y[finite], ref.maxpool2d_forward(x, kernel, stride)[finite])
    # np.argmax, which the reference's backward uses, also picks the first NaN.
    dout = rng.standard_normal(y.shape).astype(dtype)
    dx = kernels.maxpool2d_backward(dout, argmax, x.shape)
    _close(dx, ref.maxpool2d_backward(dout.astype(np.float64), x, kernel, stride), dtype)
    if kernel == 2 and stride is None:
        assert argmax[0, 0, 0, 0] == 1  # flat index of (0, 1) in the 12x12 plane
        assert argmax[7, 31, 5, 5] == 11 * 12 + 11
