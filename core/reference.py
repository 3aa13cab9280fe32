"""Plain-NumPy reference implementations, written straight from the definitions with loops.

They are slow on purpose: each line is a sum from the math, so a reader can check it by eye.
The Numba kernels in ``cnnd.core.kernels`` share their signatures and are tested against them.
In particular the convolution's input gradient is computed here literally as the *full
convolution of the upstream gradient with the kernel* (dilated by the stride, padded by k-1,
cross-correlated with the kernel flipped 180 degrees), independently of the im2col/col2im
algebra the fast kernel uses.
"""

from __future__ import annotations

import numpy as np


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pad(x: np.ndarray, ph: int, pw: int, value: float = 0.0) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def cross_correlate2d(x: np.ndarray, k: np.ndarray, sh: int = 1, sw: int = 1) -> np.ndarray:
    """y(r, c) = sum_a sum_b x(r*sh + a, c*sw + b) k(a, b) for one plane, no padding."""
    kh, kw = k.shape
    OH = (x.shape[0] - kh) // sh + 1
    OW = (x.shape[1] - kw) // sw + 1
    y = np.zeros((OH, OW), dtype=np.result_type(x, k))
    for r in range(OH):
        for c in range(OW):
            y[r, c] = np.sum(x[r * sh : r * sh + kh, c * sw : c * sw + kw] * k)
    return y


def conv2d_forward(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> np.ndarray:
    """x (N, C, H, W), w (K, C, kh, kw), b (K,) -> y (N, K, OH, OW)."""
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    xp = _pad(x, ph, pw)
    N, C = x.shape[:2]
    K = w.shape[0]
    outs = []
    for n in range(N):
        maps = []
        for k in range(K):
            y = sum(cross_correlate2d(xp[n, c], w[k, c], sh, sw) for c in range(C))
            maps.append(y + (b[k] if b is not None else 0))
        outs.append(maps)
    return np.array(outs, dtype=x.dtype)


def _dilate(d: np.ndarray, sh: int, sw: int) -> np.ndarray:
    """Insert (s - 1) zeros between neighbouring entries of a plane."""
    out = np.zeros(((d.shape[0] - 1) * sh + 1, (d.shape[1] - 1) * sw + 1), dtype=d.dtype)
    out[::sh, ::sw] = d
    return out


def conv2d_backward(
    dout: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dout (N, K, OH, OW) -> (dx, dw, db).

    dw[k, c] = cross-correlation of the padded input plane x[n, c] with dout[n, k] (dilated by
    the stride), summed over n. dx[n, c] = sum over k of the full convolution of dout[n, k]
    with w[k, c], i.e. the cross-correlation of the zero-padded dout with the flipped kernel.
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    xp = _pad(x, ph, pw)
    dw = np.zeros_like(w)
    dxp = np.zeros_like(xp)
    for n in range(N):
        for k in range(K):
            g = _dilate(dout[n, k], sh, sw)
            gh, gw = g.shape
            for c in range(C):
                # Kernel gradient: cross-correlation of the input with the upstream gradient.
                dw[k, c] += cross_correlate2d(xp[n, c, : kh - 1 + gh, : kw - 1 + gw], g)
                # Input gradient: full convolution = correlation with the flipped kernel.
                full = np.pad(g, ((kh - 1, kh - 1), (kw - 1, kw - 1)))
                dxp[n, c, : gh + kh - 1, : gw + kw - 1] += cross_correlate2d(
                    full, w[k, c, ::-1, ::-1]
                )
    dx = dxp[:, :, ph : ph + H, pw : pw + W]
    db = dout.sum(axis=(0, 2, 3))
    return dx, dw, db


def maxpool2d_forward(
    x: np.ndarray, kernel_size: int | tuple[int, int], stride=None, padding=0
) -> np.ndarray:  # type: ignore[no-untyped-def]
    """y[n, c, r, q] = max of the window, with padding read as -inf."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    xp = _pad(x, ph, pw, -np.inf)
    N, C = x.shape[:2]
    OH = (x.shape[2] + 2 * ph - kh) // sh + 1
    OW = (x.shape[3] + 2 * pw - kw) // sw + 1
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            for r in range(OH):
                for q in range(OW):
                    y[n, c, r, q] = xp[n, c, r * sh : r * sh + kh, q * sw : q * sw + kw].max()
    return y


def maxpool2d_backward(
    dout: np.ndarray, x: np.ndarray, kernel_size: int | tuple[int, int], stride=None, padding=0
) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Each window's gradient goes to the first position of its maximum."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    xp = _pad(x, ph, pw, -np.inf)
    dxp = np.zeros_like(xp)
    N, C, OH, OW = dout.shape
    for n in range(N):
        for c in range(C):
            for r in range(OH):
                for q in range(OW):
                    win = xp[n, c, r * sh : r * sh + kh, q * sw : q * sw + kw]
                    a, b = np.unravel_index(np.argmax(win), win.shape)
                    dxp[n, c, r * sh + a, q * sw + b] += dout[n, c, r, q]
    return dxp[:, :, ph : ph + x.shape[2], pw : pw + x.shape[3]]


def avgpool2d_forward(
    x: np.ndarray, kernel_size: int | tuple[int, int], stride=None, padding=0
) -> np.ndarray:  # type: ignore[no-untyped-def]
    """y[n, c, r, q] = mean of the zero-padded window (padding counts in the divisor)."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    xp = _pad(x, ph, pw)
    N, C = x.shape[:2]
    OH = (x.shape[2] + 2 * ph - kh) // sh + 1
    OW = (x.shape[3] + 2 * pw - kw) // sw + 1
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            for r in range(OH):
                for q in range(OW):
                    y[n, c, r, q] = xp[n, c, r * sh : r * sh + kh, q * sw : q * sw + kw].mean()
    return y


def avgpool2d_backward(
    dout: np.ndarray, x: np.ndarray, kernel_size: int | tuple[int, int], stride=None, padding=0
) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Each window spreads its gradient evenly over its kh*kw cells."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    dxp = np.zeros(_pad(x, ph, pw).shape, dtype=dout.dtype)
    N, C, OH, OW = dout.shape
    for n in range(N):
        for c in range(C):
            for r in range(OH):
                for q in range(OW):
                    dxp[n, c, r * sh : r * sh + kh, q * sw : q * sw + kw] += dout[n, c, r, q] / (
                        kh * kw
                    )
    return dxp[:, :, ph : ph + x.shape[2], pw : pw + x.shape[3]]


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """y[n, o] = sum_f x[n, f] w[o, f] + b[o]."""
    N, O = x.shape[0], w.shape[0]
    y = np.zeros((N, O), dtype=x.dtype)
    for n in range(N):
        for o in range(O):
            y[n, o] = np.sum(x[n] * w[o]) + (b[o] if b is not None else 0)
    return y


def linear_backward(
    dout: np.ndarray, x: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dx[n, f] = sum_o dout[n, o] w[o, f]; dw[o, f] = sum_n dout[n, o] x[n, f]; db = sum_n."""
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    for n in range(x.shape[0]):
        for o in range(w.shape[0]):
            dx[n] += dout[n, o] * w[o]
            dw[o] += dout[n, o] * x[n]
    return dx, dw, dout.sum(axis=0)


def relu_forward(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0, 0, x).astype(x.dtype)  # max(x, 0), NaN propagating


def relu_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, dout, 0).astype(dout.dtype)


def leaky_relu_forward(x: np.ndarray, negative_slope: float) -> np.ndarray:
    return np.where(x > 0, x, negative_slope * x).astype(x.dtype)


def leaky_relu_backward(dout: np.ndarray, x: np.ndarray, negative_slope: float) -> np.ndarray:
    return np.where(x > 0, dout, negative_slope * dout).astype(dout.dtype)


def tanh_forward(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


def tanh_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    return dout * (1 - np.tanh(x) ** 2)


def sigmoid_forward(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def sigmoid_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    s = 1 / (1 + np.exp(-x))
    return dout * s * (1 - s)


def batchnorm2d_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float
) -> np.ndarray:
    """Training mode: normalise each channel by its batch mean and biased variance."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    xhat = (x - mean) / np.sqrt(var + eps)
    return gamma[None, :, None, None] * xhat + beta[None, :, None, None]


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """loss = mean_n(-log softmax(z_n)[y_n]); dL/dz = (softmax(z) - onehot(y)) / N."""
    N = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(N), labels]))
    d = p.copy()
    d[np.arange(N), labels] -= 1
    return float(loss), d / N


def sgd_update(
    p: np.ndarray,
    g: np.ndarray,
    buf: np.ndarray | None,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> np.ndarray | None:
    """torch.optim.SGD, one step, in place on p; returns the new momentum buffer (None at the
    first step in, as PyTorch keeps none until then). Scalars rounded to float32."""
    f32 = np.float32
    if weight_decay:
        g = g + f32(weight_decay) * p
    if momentum:
        if buf is None:
            buf = g.copy()
        else:
            buf = buf * f32(momentum)
            buf = buf + f32(1 - dampening) * g
        g = g + f32(momentum) * buf if nesterov else buf
    p -= f32(lr) * g
    return buf


def adam_update(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> None:
    """torch.optim.Adam (``decoupled``: AdamW) at step ``step`` (from 1), in place on p, m, v."""
    f32 = np.float32
    b1, b2 = betas
    if weight_decay:
        if decoupled:
            p *= f32(1 - lr * weight_decay)
        else:
            g = g + f32(weight_decay) * p
    m *= f32(b1)
    m += f32(1 - b1) * g
    v *= f32(b2)
    v += f32(1 - b2) * (g * g)
    bias1, bias2 = 1 - b1**step, 1 - b2**step
    denom = np.sqrt(v) / f32(np.sqrt(bias2)) + f32(eps)
    p -= f32(lr / bias1) * (m / denom)
