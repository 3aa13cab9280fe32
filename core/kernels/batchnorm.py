"""Batch normalisation over the channels of NCHW batches, forward and backward.

Training normalises with the batch's statistics over (N, H, W) per channel,
xhat = (x - mean) / sqrt(var + eps) with the biased variance, y = gamma * xhat + beta, and moves
the running statistics towards them as PyTorch does (running_var takes the unbiased variance).
Evaluation normalises with the running statistics, so there y is an affine map of x.

Backward in training mode, with M = N*H*W values per channel:
dx = gamma / sqrt(var + eps) / M * (M * dy - sum(dy) - xhat * sum(dy * xhat)),
dgamma = sum(dy * xhat), dbeta = sum(dy). Sums accumulate in float64; channels run in parallel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from cnnd.core import _runtime  # noqa: F401


@njit(nogil=True, cache=True, parallel=True)
def _batchnorm_train(x, gamma, beta, eps, out, mean, var, invstd):
    N, C, H, W = x.shape
    M = N * H * W
    for c in prange(C):
        s = 0.0
        for n in range(N):
            plane = x[n, c]
            for i in range(H):
                for j in range(W):
                    s += plane[i, j]
        mu = s / M
        ss = 0.0
        for n in range(N):
            plane = x[n, c]
            for i in range(H):
                for j in range(W):
                    d = plane[i, j] - mu
                    ss += d * d
        v = ss / M
        inv = 1.0 / np.sqrt(v + eps)
        mean[c] = mu
        var[c] = v
        invstd[c] = inv
        g = gamma[c] * inv
        sh = beta[c] - mu * g
        for n in range(N):
            src = x[n, c]
            dst = out[n, c]
            for i in range(H):
                for j in range(W):
                    dst[i, j] = src[i, j] * g + sh


@njit(nogil=True, cache=True, parallel=True)
def _batchnorm_eval(x, scale, shift, out):
    N, C, H, W = x.shape
    for p in prange(N * C):
        n, c = p // C, p % C
        src = x[n, c]
        dst = out[n, c]
        g = scale[c]
        sh = shift[c]
        for i in range(H):
            for j in range(W):
                dst[i, j] = src[i, j] * g + sh


@njit(nogil=True, cache=True, parallel=True)
def _batchnorm_backward_train(dout, x, gamma, mean, invstd, dx, dgamma, dbeta):
    N, C, H, W = x.shape
    M = N * H * W
    for c in prange(C):
        mu = mean[c]
        inv = invstd[c]
        sdy = 0.0
        sdyx = 0.0
        for n in range(N):
            xp = x[n, c]
            dp = dout[n, c]
            for i in range(H):
                for j in range(W):
                    d = dp[i, j]
                    sdy += d
                    sdyx += d * (xp[i, j] - mu) * inv
        dgamma[c] = sdyx
        dbeta[c] = sdy
        k = gamma[c] * inv / M
        for n in range(N):
            xp = x[n, c]
            dp = dout[n, c]
            dxp = dx[n, c]
            for i in range(H):
                for j in range(W):
                    xhat = (xp[i, j] - mu) * inv
                    dxp[i, j] = k * (M * dp[i, j] - sdy - xhat * sdyx)


@njit(nogil=True, cache=True, parallel=True)
def _batchnorm_backward_eval(dout, x, gamma, mean, invstd, dx, dgamma, dbeta):
    N, C, H, W = x.shape
    for c in prange(C):
        mu = mean[c]
        inv = invstd[c]
        sdy = 0.0
        sdyx = 0.0
        g = gamma[c] * inv
        for n in range(N):
            xp = x[n, c]
            dp = dout[n, c]
            dxp = dx[n, c]
            for i in range(H):
                for j in range(W):
                    d = dp[i, j]
                    sdy += d
                    sdyx += d * (xp[i, j] - mu) * inv
                    dxp[i, j] = d * g
        dgamma[c] = sdyx
        dbeta[c] = sdy


def batchnorm2d_forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float,
    momentum: float,
    train: bool,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, bool]]:
    """x (N, C, H, W) -> (y, cache); in training updates running_mean / running_var in place.

    cache holds the per-channel mean and 1/std that normalised x, and the mode.
    """
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    C = x.shape[1]
    if train:
        mean = np.empty(C, dtype=np.float64)
        var = np.empty(C, dtype=np.float64)
        invstd = np.empty(C, dtype=np.float64)
        _batchnorm_train(x, gamma, beta, float(eps), out, mean, var, invstd)
        m = x.shape[0] * x.shape[2] * x.shape[3]
        unbiased = var * (m / max(m - 1, 1))
        running_mean *= 1 - momentum
        running_mean += (momentum * mean).astype(running_mean.dtype)
        running_var *= 1 - momentum
        running_var += (momentum * unbiased).astype(running_var.dtype)
    else:
        mean = running_mean.astype(np.float64)
        invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
        scale = (gamma * invstd).astype(x.dtype)
        shift = (beta - mean * gamma * invstd).astype(x.dtype)
        _batchnorm_eval(x, scale, shift, out)
    return out, (mean, invstd, train)


def batchnorm2d_backward(
    dout: np.ndarray, x: np.ndarray, gamma: np.ndarray, cache: tuple[np.ndarray, np.ndarray, bool]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dout (N, C, H, W) -> (dx, dgamma (C,), dbeta (C,)) for the mode the forward pass ran in."""
    mean, invstd, train = cache
    dx = np.empty_like(x)
    C = x.shape[1]
    dgamma = np.empty(C, dtype=x.dtype)
    dbeta = np.empty(C, dtype=x.dtype)
    kernel = _batchnorm_backward_train if train else _batchnorm_backward_eval
    kernel(np.ascontiguousarray(dout), x, gamma, mean, invstd, dx, dgamma, dbeta)
    return dx, dgamma, dbeta
