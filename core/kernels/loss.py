"""Softmax cross-entropy, the loss every cnnd classifier trains with.

loss = mean_n [ logsumexp(z_n) - z_n[y_n] ], computed with the row maximum subtracted first so
exp never overflows; dL/dz = (softmax(z) - onehot(y)) / N.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from cnnd.core import _runtime  # noqa: F401


@njit(nogil=True, cache=True)
def _softmax_cross_entropy(logits, labels, dlogits):
    N, K = logits.shape
    total = 0.0
    correct = 0
    for n in range(N):
        z = logits[n]
        m = z[0]
        best = 0
        for k in range(1, K):
            if z[k] > m:
                m = z[k]
                best = k
        s = 0.0
        for k in range(K):
            s += np.exp(z[k] - m)
        lse = m + np.log(s)
        y = labels[n]
        total += lse - z[y]
        correct += best == y
        for k in range(K):
            dlogits[n, k] = np.exp(z[k] - lse) / N
        dlogits[n, y] -= 1.0 / N
    return total / N, correct


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray, int]:
    """logits (N, K), labels (N,) ints in [0, K) -> (mean loss, dL/dlogits (N, K), #correct).

    #correct counts rows whose arg-max equals the label, for accuracy without a second pass.
    """
    logits = np.ascontiguousarray(logits)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    dlogits = np.empty_like(logits)
    if logits.shape[0] == 0:
        return 0.0, dlogits, 0
    loss, correct = _softmax_cross_entropy(logits, labels, dlogits)
    return float(loss), dlogits, int(correct)


@njit(nogil=True, cache=True)
def _softmax_rows(z, out):
    for i in range(z.shape[0]):
        m = z[i, 0]
        for k in range(1, z.shape[1]):
            m = max(m, z[i, k])
        s = 0.0
        for k in range(z.shape[1]):
            e = np.exp(z[i, k] - m)
            out[i, k] = e
            s += e
        for k in range(z.shape[1]):
            out[i, k] /= s


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits (N, K), stable for large values; a NaN logit makes its row
    NaN. One compiled pass: Infer calls this per request, where NumPy's five small array
    operations cost more than the network's forward pass."""
    z = np.ascontiguousarray(logits)
    out = np.empty_like(z)
    if z.size:
        _softmax_rows(z, out)
    return out
