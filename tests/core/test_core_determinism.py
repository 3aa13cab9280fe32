"""Determinism of the parallel kernels: for a fixed thread count, repeated calls give
bitwise-identical results (per-thread buffers are reduced in a fixed order), and calls made
concurrently from several Python threads (as the server does) give the same results too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
import pytest

from cnnd.core import kernels

DTYPES = [np.float32, np.float64]
REPEATS = 6


@pytest.fixture(params=sorted({1, numba.config.NUMBA_NUM_THREADS}), ids=lambda n: f"{n}thr")
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test with 1 thread and with every thread Numba has (2 on the target machine)."""
    before = numba.get_num_threads()
    numba.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        numba.set_num_threads(before)


def _inputs(dtype: Any) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 3, 11, 10)).astype(dtype)  # 7 samples: an uneven split
    w = rng.standard_normal((5, 3, 3, 2)).astype(dtype)
    lx = rng.standard_normal((13, 40)).astype(dtype)
    lw = rng.standard_normal((9, 40)).astype(dtype)
    return {
        "x": x,
        "w": w,
        "b": rng.standard_normal(5).astype(dtype),
        "dy": rng.standard_normal((7, 5, 6, 11)).astype(dtype),
        "lx": lx,
        "lw": lw,
        "lb": rng.standard_normal(9).astype(dtype),
        "ldy": rng.standard_normal((13, 9)).astype(dtype),
    }


def _run_all(a: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every reducing kernel once: conv/linear forward and backward, pools, batchnorm."""
    out = [
        kernels.conv2d_forward(a["x"], a["w"], a["b"], (2, 1), (1, 1)),
        kernels.conv2d_forward(a["x"], a["w"], a["b"], (2, 1), (1, 1), relu=True),
        *[g for g in kernels.conv2d_backward(a["dy"], a["x"], a["w"], (2, 1), (1, 1)) if g is not None],  # noqa: E501
        kernels.linear_forward(a["lx"], a["lw"], a["lb"]),
        *[g for g in kernels.linear_backward(a["ldy"], a["lx"], a["lw"]) if g is not None],
        kernels.maxpool2d_forward(a["x"], 2, 1, 1)[0],
        kernels.avgpool2d_forward(a["x"], 3, 2, 1),
    ]  # fmt: skip
    c = a["x"].shape[1]
    gamma = np.ones(c, a["x"].dtype)
    y, cache = kernels.batchnorm2d_forward(
        a["x"], gamma, gamma * 0, np.zeros(c, np.float32), np.ones(c, np.float32), 1e-5, 0.1, True
    )
    out += [y, *kernels.batchnorm2d_backward(a["x"], a["x"], gamma, cache)]
    return out


def _assert_bitwise(results: list[list[np.ndarray]]) -> None:
    first = results[0]
    for other in results[1:]:
        for i, (p, q) in enumerate(zip(first, other, strict=True)):
            assert p.dtype == q.dtype and np.array_equal(p, q), f"output {i} differs"


@pytest.mark.parametrize("dtype", DTYPES)
def test_repeated_calls_are_bitwise_identical(dtype: Any, threads: int) -> None:
    """Same inputs, same thread count -> the same bits, every time."""
    assert numba.get_num_threads() == threads
    a = _inputs(dtype)
    _assert_bitwise([_run_all(a) for _ in range(REPEATS)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_concurrent_calls_from_python_threads_agree(dtype: Any) -> None:
    """Kernels release the GIL (nogil) and use per-call workspaces: four Python threads
    running them at once get exactly the single-threaded caller's results."""
    a = _inputs(dtype)
    expected = _run_all(a)
    run: Callable[[int], list[np.ndarray]] = lambda _: _run_all(a)  # noqa: E731
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(8)))
    _assert_bitwise([expected, *results])


def test_thread_count_changes_only_rounding() -> None:
    """Across thread counts the reduction order may change the last bits, no more."""
    a = _inputs(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _run_all(a)
    finally:
        numba.set_num_threads(before)
    for p, q in zip(one, _run_all(a), strict=True):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-5)
