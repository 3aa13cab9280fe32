"""Compile (or load from the on-disk cache) every kernel the engine uses, in float32.

The server calls this before it reports SERVING, and the container build calls it so that
the image ships with a warm Numba cache: ``python -m cnnd.core.warmup``.
"""

from __future__ import annotations

import time

import numpy as np

from cnnd.core import kernels
from cnnd.core.kernels import activations
from cnnd.core.model import Sequential
from cnnd.core.optim import SGD, Adam
from cnnd.core.train import fit

_SPEC = {
    "input_shape": [2, 6, 6],
    "layers": [
        {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm2d"},
        {"type": "relu"},
        {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "avgpool2d", "kernel_size": 1},
        {"type": "leaky_relu"},
        {"type": "tanh"},
        {"type": "sigmoid"},
        {"type": "dropout", "p": 0.5},
        {"type": "flatten"},
        {"type": "linear", "out_features": 4},
        {"type": "relu"},
        {"type": "linear", "out_features": 3},
    ],
}


def warmup() -> float:
    """Run every kernel once (serial and parallel variants); return the seconds it took."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    model = Sequential.from_spec(_SPEC, seed=0)
    x = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
    y = rng.integers(0, 3, 4)
    fit(model, x, y, epochs=1, batch_size=4, optimizer=SGD(0.01), validation=(x, y))
    model.activations(x[:1])
    model.forward(x[:1], train=False)
    model.backward(np.ones((1, 3), np.float32), need_input_grad=True)
    # Large enough to take the parallel elementwise kernels.
    big = rng.standard_normal(activations.PARALLEL_MIN).astype(np.float32)
    mask = np.ones_like(big)
    for fwd, bwd in (
        (activations.relu_forward, activations.relu_backward),
        (activations.tanh_forward, activations.tanh_backward),
        (activations.sigmoid_forward, activations.sigmoid_backward),
        (activations.dropout_forward, activations.dropout_backward),
    ):
        y_big = fwd(big, mask) if fwd is activations.dropout_forward else fwd(big)
        bwd(big, y_big if bwd is not activations.dropout_backward else mask)
    activations.leaky_relu_backward(big, activations.leaky_relu_forward(big, 0.01), 0.01)
    # Optimizer updates, serial and parallel, for each rule a job may ask for.
    for optimizer in (SGD(0.01, momentum=0.9), Adam(1e-3)):
        params = {"small": big[:10].copy(), "large": big.copy()}
        optimizer.step(params, {"small": big[:10], "large": big})
    # Large enough for the parallel pooling and fully connected kernels (the small model above
    # takes their serial variants).
    planes = rng.standard_normal((2, 8, 64, 64)).astype(np.float32)
    pooled, argmax = kernels.maxpool2d_forward(planes, 2)
    kernels.maxpool2d_backward(pooled, argmax, planes.shape)
    kernels.avgpool2d_backward(kernels.avgpool2d_forward(planes, 2), planes.shape, 2)
    wide = rng.standard_normal((64, 512)).astype(np.float32)
    weight = rng.standard_normal((256, 512)).astype(np.float32)
    out = kernels.linear_forward(wide, weight, None, relu=True)
    kernels.linear_backward(out, wide, weight, need_dx=True, y=out)
    kernels.softmax(out)  # Infer's probabilities
    # 3x3 layers of 16+ channels take the Winograd forward: serial (one sample) and parallel.
    fmaps = rng.standard_normal((2, 16, 6, 6)).astype(np.float32)
    kernels3 = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    for n in (1, 2):
        kernels.conv2d_forward(fmaps[:n], kernels3, None, 1, 1, relu=True)
    return time.perf_counter() - t0


if __name__ == "__main__":
    print(f"cnnd kernels ready in {warmup():.1f} s")
