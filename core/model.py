"""Sequential: a stack of layers built from a declarative spec.

Parameter names follow ``torch.nn.Sequential`` built from the same layers ("0.weight",
"0.bias", "4.running_mean", ...), so a state_dict moves between cnnd and PyTorch unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from cnnd.core.layers import LAYERS, Conv2d, Layer, Linear, ReLU
from cnnd.core.spec import DEFAULT_LIMITS, SpecLimits, SpecSummary, validate_spec


class Sequential:
    """A feed-forward CNN. Build it with ``Sequential.from_spec(spec, seed)``.

    ``forward(x)`` takes x (N, C, H, W) float32 and returns the output of the last layer,
    typically logits (N, classes); ``backward(dlogits)`` fills every parameter's gradient
    (read them with ``grads()``) and returns dL/dx (N, C, H, W).
    """

    def __init__(self, spec: dict[str, Any], summary: SpecSummary, layers: list[Layer]) -> None:
        self.spec = spec
        self.summary_info = summary
        self.layers = layers
        self._fuse()

    @classmethod
    def from_spec(
        cls, spec: object, seed: int = 0, limits: SpecLimits = DEFAULT_LIMITS
    ) -> Sequential:
        """Validate the whole spec (ValueError naming layer, type and problem), then allocate."""
        normalised, summary = validate_spec(spec, limits)
        layers = [LAYERS[entry["type"]](entry) for entry in normalised["layers"]]
        model = cls(normalised, summary, layers)
        model.reset_parameters(seed)
        return model

    def reset_parameters(self, seed: int) -> None:
        """PyTorch's default initialisation, drawn from one generator seeded with ``seed``."""
        rng = np.random.default_rng(seed)
        for layer in self.layers:
            layer.reset_parameters(rng)

    def _fuse(self, on: bool = True) -> None:
        # conv2d/linear followed by relu: the rectifier runs inside the GEMM's epilogue and the
        # ReLU layer only records the output its backward needs.
        for prev, layer in zip(self.layers, self.layers[1:], strict=False):
            if isinstance(layer, ReLU) and isinstance(prev, Conv2d | Linear):
                prev.fuse_relu = layer.fused = on

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.spec["input_shape"])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.summary_info.output_shape

    @property
    def dtype(self) -> np.dtype:
        for layer in self.layers:
            for p in layer.params.values():
                return p.dtype
        return np.dtype(np.float32)

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        """x (N, C, H, W) -> output (N, *output_shape). ``train`` enables dropout and batch
        statistics; it also keeps what backward needs."""
        x = self.check_input(x)
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    __call__ = forward

    def backward(self, dout: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        """dL/doutput -> dL/dx; leaves each parameter's gradient for ``grads()``.

        Training passes ``need_input_grad=False``: the first layer then skips its dL/dx.
        """
        for i in range(len(self.layers) - 1, -1, -1):
            need = need_input_grad or i > 0
            dout = self.layers[i].backward(dout, need)  # type: ignore[assignment]
            if dout is None:
                return None
        return dout

    def activations(self, x: np.ndarray) -> list[np.ndarray]:
        """Every layer's output for x (N, C, H, W) in evaluation mode. Fusion is off here, so
        a conv layer's own output is seen before the ReLU that follows it."""
        x = self.check_input(x)
        outs = []
        self._fuse(False)
        try:
            for layer in self.layers:
                x = layer.forward(x, False)
                outs.append(x)
        finally:
            self._fuse(True)
        return outs

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """x checked against the model's input shape and dtype; a read-only array (a view of a
        request's bytes, a memmap) is copied, so the kernels see one array type and are not
        compiled again for read-only arrays."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"input has shape {tuple(x.shape)}; the model expects (N, "
                f"{', '.join(map(str, self.input_shape))})"
            )
        if x.dtype != self.dtype:
            raise ValueError(f"input dtype is {x.dtype}; the model computes in {self.dtype}")
        return x if x.flags.writeable and x.flags.c_contiguous else np.array(x, order="C")

    def named_parameters(self) -> dict[str, np.ndarray]:
        return {
            f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.params.items()
        }

    def grads(self) -> dict[str, np.ndarray]:
        """Gradients of the last backward pass, named like ``named_parameters()``."""
        out = {}
        for i, layer in enumerate(self.layers):
            for k, p in layer.params.items():
                g = layer.grads.get(k)
                out[f"{i}.{k}"] = g if g is not None else np.zeros_like(p)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters and buffers, copied, in torch.nn.Sequential's order and names."""
        out = {}
        for i, layer in enumerate(self.layers):
            for k, v in layer.params.items():
                out[f"{i}.{k}"] = v.copy()
            for k, v in layer.buffers.items():
                out[f"{i}.{k}"] = v.copy()
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy values in; names, shapes and finiteness must match exactly (nothing changes on
        error)."""
        expected = {
            f"{i}.{k}": v
            for i, layer in enumerate(self.layers)
            for k, v in (layer.params | layer.buffers).items()
        }
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"state_dict does not match the model: missing {missing}, unexpected {unexpected}"
            )
        for name, target in expected.items():
            value = np.asarray(state[name])
            if value.shape != target.shape:
                raise ValueError(
                    f"state_dict[{name!r}] has shape {value.shape}; the model expects "
                    f"{target.shape}"
                )
            if value.dtype.kind not in "fiu":
                raise ValueError(f"state_dict[{name!r}] has non-numeric dtype {value.dtype}")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"state_dict[{name!r}] holds NaN or infinite values")
        for name, target in expected.items():
            target[...] = np.asarray(state[name]).astype(target.dtype)

    def astype(self, dtype: type[np.floating] | np.dtype) -> Sequential:
        """A copy computing in ``dtype`` (float64 for gradient checks)."""
        other = copy.deepcopy(self)
        for layer in other.layers:
            for k, v in layer.params.items():
                layer.params[k] = v.astype(dtype)
            layer.grads.clear()
        return other

    def num_parameters(self) -> int:
        return self.summary_info.parameters

    def summary(self) -> str:
        """Per layer: output shape, parameters, multiply-accumulates and receptive field."""
        rows = [("#", "layer", "output", "params", "MACs", "receptive field")]
        for r in self.summary_info.layers:
            rf = (
                f"{r.receptive_field[0]}x{r.receptive_field[1]} (jump {r.jump[0]}x{r.jump[1]})"
                if r.receptive_field and r.jump
                else "whole input"
            )
            shape = "x".join(map(str, r.output_shape))
            rows.append((str(r.index), r.type, shape, f"{r.parameters:,}", f"{r.macs:,}", rf))
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
        ]
        info = self.summary_info
        lines.append(
            f"input {'x'.join(map(str, info.input_shape))}, {info.parameters:,} parameters, "
            f"{info.macs:,} MACs per sample"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        inner = ", ".join(layer.type for layer in self.layers)
        return f"Sequential({inner})"
