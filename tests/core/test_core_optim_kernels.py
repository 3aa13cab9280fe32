"""The fused optimizer updates (core/kernels/optim.py) against the NumPy transcription of
PyTorch's rules in core/reference.py: equal to the bit over several steps, for every option,
both dtypes, and sizes on both sides of the parallel threshold."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnd.core import SGD, Adam, AdamW
from cnnd.core import reference as ref
from cnnd.core.kernels import optim as kopt

SIZES = st.sampled_from([(1,), (7,), (3, 5, 2), (kopt.PARALLEL_MIN + 13,)])
DTYPES = st.sampled_from([np.float32, np.float64])


@settings(max_examples=40, deadline=None)
@given(
    shape=SIZES,
    dtype=DTYPES,
    # 1e-50 rounds to 0 in float32 but still turns its term on, as in the reference.
    momentum=st.sampled_from([0.0, 0.5, 0.9, 1e-50]),
    dampening=st.sampled_from([0.0, 0.3]),
    weight_decay=st.sampled_from([0.0, 1e-3, 1e-50]),
    nesterov=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_sgd_step_equals_reference(
    shape: tuple[int, ...], dtype: Any, momentum: float, dampening: float,
    weight_decay: float, nesterov: bool, seed: int,
) -> None:  # fmt: skip
    if nesterov and (momentum == 0 or dampening != 0):
        return  # PyTorch's constraint; SGD() refuses it
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(shape).astype(dtype)
    want = p.copy()
    buf = np.empty_like(p)
    want_buf = None
    for step in range(3):
        g = rng.standard_normal(shape).astype(dtype)
        kopt.sgd_step(p, g, buf, step == 0, 0.05, momentum, dampening, weight_decay, nesterov)
        want_buf = ref.sgd_update(want, g, want_buf, 0.05, momentum, dampening, weight_decay,
                                  nesterov)  # fmt: skip
        np.testing.assert_array_equal(p, want)
        if momentum:
            np.testing.assert_array_equal(buf, want_buf)
    assert p.dtype == dtype


@settings(max_examples=30, deadline=None)
@given(
    shape=SIZES,
    dtype=DTYPES,
    betas=st.sampled_from([(0.9, 0.999), (0.8, 0.99)]),
    eps=st.sampled_from([1e-8, 1e-6]),
    weight_decay=st.sampled_from([0.0, 0.1, 1e-50]),
    decoupled=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_adam_step_equals_reference(
    shape: tuple[int, ...], dtype: Any, betas: tuple[float, float], eps: float,
    weight_decay: float, decoupled: bool, seed: int,
) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(shape).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    want, wm, wv = p.copy(), m.copy(), v.copy()
    for step in range(1, 4):
        g = rng.standard_normal(shape).astype(dtype)
        kopt.adam_step(p, g, m, v, step, 0.01, betas, eps, weight_decay, decoupled)
        ref.adam_update(want, g, wm, wv, step, 0.01, betas, eps, weight_decay, decoupled)
        for got, exp in ((p, want), (m, wm), (v, wv)):
            np.testing.assert_array_equal(got, exp)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SGD(lr=0.1),
        lambda: SGD(lr=0.1, momentum=0.9, weight_decay=1e-4),
        lambda: SGD(lr=0.1, momentum=0.9, nesterov=True),
        lambda: Adam(lr=0.01),
        lambda: AdamW(lr=0.01, weight_decay=0.05),
    ],
    ids=["sgd", "sgd-momentum-wd", "sgd-nesterov", "adam", "adamw"],
)
def test_optimizer_state_round_trip_resumes_exactly(make: Any) -> None:
    """Steps 1-2, a state_dict saved and loaded into a new optimizer, steps 3-4: the same
    parameters as four steps without the interruption (the buffers are plain arrays)."""
    rng = np.random.default_rng(5)
    start = {"w": rng.standard_normal((300, 7)).astype(np.float32)}
    grads = [{"w": rng.standard_normal((300, 7)).astype(np.float32)} for _ in range(4)]
    straight = {k: v.copy() for k, v in start.items()}
    opt = make()
    for g in grads:
        opt.step(straight, g)
    resumed = {k: v.copy() for k, v in start.items()}
    first = make()
    for g in grads[:2]:
        first.step(resumed, g)
    second = make()
    second.load_state_dict(first.state_dict())
    for g in grads[2:]:
        second.step(resumed, g)
    np.testing.assert_array_equal(resumed["w"], straight["w"])


def test_non_contiguous_parameter_is_refused() -> None:
    p = np.zeros((4, 6), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        kopt.sgd_step(p, np.ones_like(p), np.empty_like(p), True, 0.1, 0.9, 0.0, 0.0, False)


def test_state_of_another_shape_is_refused_before_the_kernel_runs() -> None:
    """The loops index every array up to the parameter's size: a momentum buffer or moment
    of another shape (say, from a checkpoint of another model) must be refused, not read or
    written past its end."""
    p = np.zeros(100, np.float32)
    with pytest.raises(ValueError, match="does not match"):
        short = np.empty(10, np.float32)
        kopt.sgd_step(p, np.ones_like(p), short, False, 0.1, 0.9, 0.0, 0.0, False)
    with pytest.raises(ValueError, match="does not match"):
        kopt.adam_step(p, np.ones(99, np.float32), np.zeros_like(p), np.zeros_like(p), 1, 0.1,
                       (0.9, 0.999), 1e-8, 0.0, False)  # fmt: skip
    opt = SGD(lr=0.1, momentum=0.9)
    opt.step({"w": np.zeros(10, np.float32)}, {"w": np.ones(10, np.float32)})
    with pytest.raises(ValueError, match="does not match"):
        opt.step({"w": np.zeros(100, np.float32)}, {"w": np.ones(100, np.float32)})


def test_a_refused_first_step_leaves_no_momentum_buffer() -> None:
    """A first step refused for a gradient of the wrong shape keeps no (uninitialised) buffer:
    the next step is still a first step, and matches one taken without the failure."""
    opt, clean = SGD(lr=0.1, momentum=0.9, dampening=0.5), SGD(lr=0.1, momentum=0.9, dampening=0.5)
    p, q = np.ones(8, np.float32), np.ones(8, np.float32)
    with pytest.raises(ValueError):
        opt.step({"w": p}, {"w": np.ones(9, np.float32)})
    assert "momentum_buffer" not in opt.state.get("w", {})
    g = np.full(8, 0.5, np.float32)
    opt.step({"w": p}, {"w": g})
    clean.step({"w": q}, {"w": g})
    np.testing.assert_array_equal(p, q)
