"""Layers: each owns its parameters, their gradients and what its backward pass needs.

The math lives in the stateless kernels of ``cnnd.core.kernels``; a layer only keeps state
(PyTorch's module/functional split). Every layer is built from a normalised spec entry (see
``cnnd.core.spec``), with PyTorch's argument names and default initialisation.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from cnnd.core import kernels


class Layer:
    """Base class: forward(x, train) -> y, backward(dy, need_dx) -> dx or None."""

    type: ClassVar[str]

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        raise NotImplementedError

    def reset_parameters(self, rng: np.random.Generator) -> None:
        """Draw initial parameters; layers without parameters have nothing to do."""

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.params.items())
        return f"{type(self).__name__}({shapes})"


def _kaiming_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    # PyTorch's default: kaiming_uniform_(w, a=sqrt(5)) gives bound = 1 / sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


class Conv2d(Layer):
    type = "conv2d"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        c, k = spec["in_channels"], spec["out_channels"]
        kh, kw = spec["kernel_size"]
        self.stride = tuple(spec["stride"])
        self.padding = tuple(spec["padding"])
        self.params["weight"] = np.zeros((k, c, kh, kw), dtype=np.float32)
        if spec["bias"]:
            self.params["bias"] = np.zeros(k, dtype=np.float32)
        self.fuse_relu = False  # set by Sequential when a ReLU follows; see Sequential._fuse
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None  # output, kept for the fused ReLU's derivative
        self.workspace = kernels.Workspace()

    def reset_parameters(self, rng: np.random.Generator) -> None:
        w = self.params["weight"]
        fan_in = int(np.prod(w.shape[1:]))
        w[:] = _kaiming_uniform(rng, w.shape, fan_in)
        if "bias" in self.params:
            self.params["bias"][:] = _kaiming_uniform(rng, self.params["bias"].shape, fan_in)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        y = kernels.conv2d_forward(
            x, self.params["weight"], self.params.get("bias"), self.stride, self.padding,
            relu=self.fuse_relu, workspace=self.workspace, keep_col=train,
        )  # fmt: skip
        self._x, self._y = x, y
        return y

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        assert self._x is not None, "backward before forward"
        dx, dw, db = kernels.conv2d_backward(
            dout, self._x, self.params["weight"], self.stride, self.padding, need_dx,
            y=self._y if self.fuse_relu else None, workspace=self.workspace,
        )  # fmt: skip
        self.grads["weight"] = dw
        if "bias" in self.params:
            self.grads["bias"] = db
        return dx


class _Pool(Layer):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.kernel_size = tuple(spec["kernel_size"])
        self.stride = tuple(spec["stride"] or spec["kernel_size"])
        self.padding = tuple(spec["padding"])
        self._x_shape: tuple[int, ...] = ()


class MaxPool2d(_Pool):
    type = "maxpool2d"

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self._x_shape = x.shape
        y, self._argmax = kernels.maxpool2d_forward(x, self.kernel_size, self.stride, self.padding)
        return y

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        return kernels.maxpool2d_backward(dout, self._argmax, self._x_shape) if need_dx else None


class AvgPool2d(_Pool):
    type = "avgpool2d"

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self._x_shape = x.shape
        return kernels.avgpool2d_forward(x, self.kernel_size, self.stride, self.padding)

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        return kernels.avgpool2d_backward(
            dout, self._x_shape, self.kernel_size, self.stride, self.padding
        )


class Linear(Layer):
    type = "linear"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.params["weight"] = np.zeros(
            (spec["out_features"], spec["in_features"]), dtype=np.float32
        )
        if spec["bias"]:
            self.params["bias"] = np.zeros(spec["out_features"], dtype=np.float32)
        self.fuse_relu = False
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None

    def reset_parameters(self, rng: np.random.Generator) -> None:
        w = self.params["weight"]
        w[:] = _kaiming_uniform(rng, w.shape, w.shape[1])
        if "bias" in self.params:
            self.params["bias"][:] = _kaiming_uniform(rng, self.params["bias"].shape, w.shape[1])

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        y = kernels.linear_forward(
            x, self.params["weight"], self.params.get("bias"), relu=self.fuse_relu
        )
        self._x, self._y = x, y
        return y

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        assert self._x is not None, "backward before forward"
        dx, dw, db = kernels.linear_backward(
            dout, self._x, self.params["weight"], need_dx, y=self._y if self.fuse_relu else None
        )
        self.grads["weight"] = dw
        if "bias" in self.params:
            self.grads["bias"] = db
        return dx


class ReLU(Layer):
    type = "relu"

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        # Fused: the layer before applies the rectifier in its forward pass and its derivative
        # in its backward pass; this layer then passes both directions through.
        self.fused = False
        self._y: np.ndarray | None = None

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        if self.fused:
            return x
        # Return the local, not the attribute: inference calls one model from many threads.
        y = self._y = kernels.relu_forward(x)
        return y

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        if self.fused:
            return dout
        assert self._y is not None, "backward before forward"
        return kernels.relu_backward(dout, self._y)


class LeakyReLU(Layer):
    type = "leaky_relu"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.negative_slope = float(spec["negative_slope"])

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self._x = x
        return kernels.leaky_relu_forward(x, self.negative_slope)

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        return kernels.leaky_relu_backward(dout, self._x, self.negative_slope) if need_dx else None


class Tanh(Layer):
    type = "tanh"

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        super().__init__()

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        y = self._y = kernels.tanh_forward(x)
        return y

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        return kernels.tanh_backward(dout, self._y) if need_dx else None


class Sigmoid(Layer):
    type = "sigmoid"

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        super().__init__()

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        y = self._y = kernels.sigmoid_forward(x)
        return y

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        return kernels.sigmoid_backward(dout, self._y) if need_dx else None


class Flatten(Layer):
    type = "flatten"

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        super().__init__()

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        self._x_shape = x.shape
        # The feature count is given explicitly: reshape cannot infer -1 for an empty batch.
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        return dout.reshape(self._x_shape) if need_dx else None


class Dropout(Layer):
    """Inverted dropout. The mask comes from ``self.rng``, which the trainer reseeds per step
    from (seed, epoch, step) so that a resumed run draws the same masks."""

    type = "dropout"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.p = float(spec["p"])
        self.rng = np.random.default_rng(0)
        self._mask: np.ndarray | None = None

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        if not train or self.p == 0:
            self._mask = None
            return x
        self._mask = kernels.dropout_mask(x.shape, self.p, self.rng, x.dtype.type)
        return kernels.dropout_forward(x, self._mask)

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        return dout if self._mask is None else kernels.dropout_backward(dout, self._mask)


class BatchNorm2d(Layer):
    type = "batchnorm2d"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        c = spec["num_features"]
        self.eps = float(spec["eps"])
        self.momentum = float(spec["momentum"])
        self.affine = bool(spec["affine"])
        if self.affine:
            self.params["weight"] = np.ones(c, dtype=np.float32)
            self.params["bias"] = np.zeros(c, dtype=np.float32)
        self.buffers["running_mean"] = np.zeros(c, dtype=np.float32)
        self.buffers["running_var"] = np.ones(c, dtype=np.float32)
        self.buffers["num_batches_tracked"] = np.zeros((), dtype=np.int64)

    def reset_parameters(self, rng: np.random.Generator) -> None:
        if self.affine:
            self.params["weight"][:] = 1
            self.params["bias"][:] = 0
        self.buffers["running_mean"][:] = 0
        self.buffers["running_var"][:] = 1
        self.buffers["num_batches_tracked"][...] = 0

    def _affine(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        if self.affine:
            return self.params["weight"].astype(dtype), self.params["bias"].astype(dtype)
        c = self.buffers["running_mean"].shape[0]
        return np.ones(c, dtype=dtype), np.zeros(c, dtype=dtype)

    def forward(self, x: np.ndarray, train: bool) -> np.ndarray:
        gamma, beta = self._affine(x.dtype)
        self._x = np.ascontiguousarray(x)
        y, self._cache = kernels.batchnorm2d_forward(
            self._x, gamma, beta, self.buffers["running_mean"], self.buffers["running_var"],
            self.eps, self.momentum, train,
        )  # fmt: skip
        if train:
            self.buffers["num_batches_tracked"] += 1
        return y

    def backward(self, dout: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        gamma, _ = self._affine(self._x.dtype)
        dx, dgamma, dbeta = kernels.batchnorm2d_backward(dout, self._x, gamma, self._cache)
        if self.affine:
            self.grads["weight"] = dgamma
            self.grads["bias"] = dbeta
        return dx if need_dx else None


LAYERS: dict[str, type[Layer]] = {
    cls.type: cls
    for cls in (
        Conv2d, MaxPool2d, AvgPool2d, Linear, ReLU, LeakyReLU, Tanh, Sigmoid, Flatten, Dropout,
        BatchNorm2d,
    )
}  # fmt: skip
