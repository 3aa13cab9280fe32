"""Stateless Numba kernels, in forward/backward pairs; every array is explicit.

Reference implementations written from the definitions live in ``cnnd.core.reference``; the
tests compare each kernel with its reference and with finite differences.
"""

from cnnd.core.kernels.activations import (
    dropout_backward,
    dropout_forward,
    dropout_mask,
    leaky_relu_backward,
    leaky_relu_forward,
    relu_backward,
    relu_forward,
    sigmoid_backward,
    sigmoid_forward,
    tanh_backward,
    tanh_forward,
)
from cnnd.core.kernels.batchnorm import batchnorm2d_backward, batchnorm2d_forward
from cnnd.core.kernels.conv import conv2d_backward, conv2d_forward, conv_output_size
from cnnd.core.kernels.dense import linear_backward, linear_forward
from cnnd.core.kernels.loss import softmax, softmax_cross_entropy
from cnnd.core.kernels.pool import (
    avgpool2d_backward,
    avgpool2d_forward,
    maxpool2d_backward,
    maxpool2d_forward,
)
from cnnd.core.kernels.workspace import Workspace

__all__ = [
    "Workspace",
    "avgpool2d_backward",
    "avgpool2d_forward",
    "batchnorm2d_backward",
    "batchnorm2d_forward",
    "conv2d_backward",
    "conv2d_forward",
    "conv_output_size",
    "dropout_backward",
    "dropout_forward",
    "dropout_mask",
    "leaky_relu_backward",
    "leaky_relu_forward",
    "linear_backward",
    "linear_forward",
    "maxpool2d_backward",
    "maxpool2d_forward",
    "relu_backward",
    "relu_forward",
    "sigmoid_backward",
    "sigmoid_forward",
    "softmax",
    "softmax_cross_entropy",
    "tanh_backward",
    "tanh_forward",
]
