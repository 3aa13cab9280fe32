"""The Winograd F(2x2, 3x3) forward (core/kernels/winograd.py) against the plain-NumPy
reference and against the im2col path it replaces, over the geometries it serves: odd and even
sizes (partial output tiles), paddings 0-2, outputs of one pixel, channel counts that are not
multiples of anything, one and several samples per thread, fused ReLU."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnd.core import kernels
from cnnd.core import reference as ref
from cnnd.core.kernels import conv, winograd
from cnnd.core.kernels.workspace import Workspace

# Relative to the largest output: the transforms reassociate the sums of C*9 products.
TOL = {np.float64: 1e-12, np.float32: 2e-6}


def _im2col_forward(monkeypatch: pytest.MonkeyPatch, *args: Any, **kw: Any) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(winograd, "applies", lambda *a: False)
        return kernels.conv2d_forward(*args, **kw)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5),
    c=st.sampled_from([16, 19, 21, 24]),  # multiples of 8 (float32) take the 8-channel transforms
    k=st.sampled_from([16, 18, 24]),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    padding=st.sampled_from([0, 1, 2, (1, 0), (0, 2)]),
    relu=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_winograd_matches_reference(
    n: int, c: int, k: int, h: int, w: int, padding: Any, relu: bool, dtype: Any, seed: int
) -> None:
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    if h + 2 * ph < 3 or w + 2 * pw < 3:
        return  # no window fits
    assert winograd.applies(c, k, (3, 3), (1, 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((k, c, 3, 3)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    y = kernels.conv2d_forward(x, wt, b, 1, (ph, pw), relu=relu, workspace=Workspace())
    r = ref.conv2d_forward(x.astype(np.float64), wt.astype(np.float64), b.astype(np.float64),
                           1, (ph, pw))  # fmt: skip
    if relu:
        r = np.maximum(r, 0)
    assert y.shape == r.shape and y.dtype == dtype
    scale = max(np.abs(r).max(), 1.0)
    assert np.abs(y - r).max() / scale < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_agrees_with_im2col_on_cifar_layers(
    monkeypatch: pytest.MonkeyPatch, dtype: Any
) -> None:
    """The layers the engine benchmark times: the two paths agree to float rounding, on the
    parallel driver (a batch of 8) and the serial one (a batch of 1)."""
    rng = np.random.default_rng(0)
    for c, k, size in ((32, 32, 32), (32, 64, 16), (64, 64, 16)):
        for n in (1, 8):
            x = rng.standard_normal((n, c, size, size)).astype(dtype)
            wt = (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(dtype)
            b = rng.standard_normal(k).astype(dtype)
            got = kernels.conv2d_forward(x, wt, b, 1, 1, relu=True)
            want = _im2col_forward(monkeypatch, x, wt, b, 1, 1, relu=True)
            scale = np.abs(want).max()
            assert np.abs(got - want).max() / scale < TOL[dtype], (c, k, size, n)


def test_winograd_forward_then_backward_matches_im2col(monkeypatch: pytest.MonkeyPatch) -> None:
    """A training step through a layer that takes the Winograd forward: the backward pass,
    which then unrolls the input itself, gives the gradients of the im2col path."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 16, 9, 9))
    wt = rng.standard_normal((18, 16, 3, 3)) / 12
    b = rng.standard_normal(18)
    dout = rng.standard_normal((6, 18, 9, 9))
    ws = Workspace()
    y = kernels.conv2d_forward(x, wt, b, 1, 1, relu=True, workspace=ws, keep_col=True)
    assert ws.kept is None  # nothing unrolled to keep
    dx, dw, db = kernels.conv2d_backward(dout, x, wt, 1, 1, y=y, workspace=ws)
    ws2 = Workspace()
    y2 = _im2col_forward(monkeypatch, x, wt, b, 1, 1, relu=True, workspace=ws2, keep_col=True)
    assert ws2.kept is not None
    dx2, dw2, db2 = kernels.conv2d_backward(dout, x, wt, 1, 1, y=y2, workspace=ws2)
    np.testing.assert_allclose(y, y2, rtol=1e-12, atol=1e-12)
    for a, b_ in ((dx, dx2), (dw, dw2), (db, db2)):
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-12)


def test_winograd_is_deterministic() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 24, 13, 13)).astype(np.float32)
    wt = rng.standard_normal((20, 24, 3, 3)).astype(np.float32)
    b = rng.standard_normal(20).astype(np.float32)
    first = kernels.conv2d_forward(x, wt, b, 1, 1, workspace=Workspace())
    for _ in range(3):
        np.testing.assert_array_equal(kernels.conv2d_forward(x, wt, b, 1, 1), first)


def test_winograd_serves_only_what_it_can() -> None:
    assert not winograd.applies(3, 32, (3, 3), (1, 1))  # first layers: im2col
    assert not winograd.applies(32, 32, (3, 3), (2, 2))
    assert not winograd.applies(32, 32, (5, 5), (1, 1))
    assert winograd.applies(16, 16, (3, 3), (1, 1))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    c=st.sampled_from([16, 19, 24]),
    k=st.sampled_from([16, 17, 24]),
    h=st.integers(1, 10),
    w=st.integers(1, 10),
    padding=st.sampled_from([0, 1, 2, (2, 1)]),
    relu=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
    winograd_dx=st.booleans(),
)
def test_gradients_after_a_winograd_forward_match_reference(
    n: int, c: int, k: int, h: int, w: int, padding: Any, relu: bool, dtype: Any, seed: int,
    winograd_dx: bool,
) -> None:  # fmt: skip
    """After a Winograd forward (which keeps nothing unrolled), the backward pass gives the
    reference's dx (full convolution), dw and db, the fused ReLU's mask taken from the
    Winograd output; dx from the GEMM + col2im path, or from the Winograd path (the flipped,
    transposed kernel over dY masked as it is padded), which wide layers take."""
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    if h + 2 * ph < 3 or w + 2 * pw < 3:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((k, c, 3, 3)).astype(dtype)
    y = kernels.conv2d_forward(x, wt, None, 1, (ph, pw), relu=relu)
    dout = rng.standard_normal(y.shape).astype(dtype)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(conv, "WINOGRAD_DX_MIN", 16 if winograd_dx else 10**9)
        dx, dw, db = kernels.conv2d_backward(dout, x, wt, 1, (ph, pw), y=y if relu else None)
    assert dx is not None
    masked = np.where(y > 0, dout, 0) if relu else dout
    rdx, rdw, rdb = ref.conv2d_backward(masked.astype(np.float64), x.astype(np.float64),
                                        wt.astype(np.float64), 1, (ph, pw))  # fmt: skip
    for got, want in ((dx, rdx), (dw, rdw), (db, rdb)):
        assert got.shape == want.shape and got.dtype == dtype
        scale = max(np.abs(want).max(), 1.0)
        assert np.abs(got - want).max() / scale < TOL[dtype] * 10


def test_winograd_blocks_and_reused_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several blocks per thread with a partial last one (a small block budget), and one
    workspace reused across batch sizes and shapes, give the reference's output."""
    monkeypatch.setattr(winograd, "BLOCK_BUDGET", 16 * 16 * 9 * 2)  # two 6x6 samples a block
    ws = Workspace()
    rng = np.random.default_rng(3)
    for n, size in ((7, 6), (3, 9), (11, 6), (1, 4)):
        x = rng.standard_normal((n, 16, size, size))
        wt = rng.standard_normal((16, 16, 3, 3))
        b = rng.standard_normal(16)
        y = kernels.conv2d_forward(x, wt, b, 1, 1, workspace=ws)
        r = ref.conv2d_forward(x, wt, b, 1, 1)
        np.testing.assert_allclose(y, r, rtol=1e-12, atol=1e-12)


def test_winograd_empty_outputs() -> None:
    """An input smaller than the kernel (no padding) or an empty batch gives an empty output,
    as on the im2col path."""
    w = np.ones((16, 16, 3, 3), np.float32)
    assert kernels.conv2d_forward(np.ones((1, 16, 2, 5), np.float32), w, None).shape == (
        1, 16, 0, 3)  # fmt: skip
    assert kernels.conv2d_forward(np.ones((0, 16, 5, 5), np.float32), w, None).shape == (
        0, 16, 3, 3)  # fmt: skip


def test_wide_layers_take_the_winograd_input_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64-channel layer (the CIFAR-type net's last conv) takes the Winograd path for dx at
    the shipped threshold, and its dx equals the GEMM path's to float32 rounding."""
    assert conv.WINOGRAD_DX_MIN <= 32
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 64, 8, 8)).astype(np.float32)
    wt = (rng.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32)
    y = kernels.conv2d_forward(x, wt, None, 1, 1, relu=True)
    dout = rng.standard_normal(y.shape).astype(np.float32)
    calls: list[Any] = []
    real = winograd.conv3x3_forward

    def spy(*args: Any, **kw: Any) -> np.ndarray:
        calls.append(kw.get("mask"))
        return real(*args, **kw)

    monkeypatch.setattr(winograd, "conv3x3_forward", spy)
    dx, _, _ = kernels.conv2d_backward(dout, x, wt, 1, 1, y=y)
    assert len(calls) == 1 and calls[0] is y  # the Winograd path ran for dx, masked by y
    monkeypatch.setattr(conv, "WINOGRAD_DX_MIN", 10**9)
    dx2, _, _ = kernels.conv2d_backward(dout, x, wt, 1, 1, y=y)
    assert dx is not None and dx2 is not None
    assert np.abs(dx - dx2).max() / np.abs(dx2).max() < TOL[np.float32] * 4


@pytest.mark.parametrize("padding", [0, 1, 2, (2, 0)])
@pytest.mark.parametrize("relu", [False, True])
def test_winograd_input_gradient_over_paddings(
    monkeypatch: pytest.MonkeyPatch, padding: Any, relu: bool
) -> None:
    """dL/dx on the Winograd path (threshold lowered to 16 channels, float32 so that its
    products run on gemm.py) against the reference's full convolution, every padding the
    path takes, with and without the fused ReLU's mask."""
    monkeypatch.setattr(conv, "WINOGRAD_DX_MIN", 16)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 16, 7, 6)).astype(np.float32)
    wt = (rng.standard_normal((24, 16, 3, 3)) / 12).astype(np.float32)
    y = kernels.conv2d_forward(x, wt, None, 1, padding, relu=relu)
    dout = rng.standard_normal(y.shape).astype(np.float32)
    dx, _, _ = kernels.conv2d_backward(dout, x, wt, 1, padding, y=y if relu else None)
    masked = np.where(y > 0, dout, 0) if relu else dout
    want, _, _ = ref.conv2d_backward(masked.astype(np.float64), x.astype(np.float64),
                                     wt.astype(np.float64), 1, padding)  # fmt: skip
    assert dx is not None
    assert np.abs(dx - want).max() / np.abs(want).max() < 1e-5


def test_backward_refuses_shapes_that_do_not_chain() -> None:
    """The kernels index without bounds checks, so a dout or mask of the wrong shape is an
    error before anything runs (the Winograd dx path would otherwise write past dx)."""
    x = np.zeros((2, 64, 6, 6), np.float32)
    wt = np.zeros((64, 64, 3, 3), np.float32)
    with pytest.raises(ValueError, match="do not match"):
        kernels.conv2d_backward(np.zeros((2, 64, 9, 6), np.float32), x, wt, 1, 1)
    with pytest.raises(ValueError, match="do not match"):
        kernels.conv2d_backward(np.zeros((3, 64, 6, 6), np.float32), x, wt, 1, 1)
    with pytest.raises(ValueError, match="shape of dout"):
        kernels.conv2d_backward(np.zeros((2, 64, 6, 6), np.float32), x, wt, 1, 1,
                                y=np.zeros((2, 64, 5, 6), np.float32))  # fmt: skip
    with pytest.raises(ValueError, match="do not match"):
        kernels.conv2d_forward(np.zeros((2, 63, 6, 6), np.float32), wt, None, 1, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.conv2d_forward(x, wt, None, 1, 1, out=np.zeros((2, 64, 5, 6), np.float32))
