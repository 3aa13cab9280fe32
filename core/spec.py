"""Model specs: validation and shape inference, done with Python ints before anything is allocated.

A spec is the JSON-able dict the engine, the service and the CLI all accept::

    {"input_shape": [1, 28, 28],
     "layers": [{"type": "conv2d", "out_channels": 6, "kernel_size": 5, "padding": 2},
                {"type": "relu"}, {"type": "maxpool2d", "kernel_size": 2},
                {"type": "flatten"}, {"type": "linear", "out_features": 10}]}

Argument names are those of PyTorch's constructors. ``in_channels``, ``in_features`` and
``num_features`` are inferred from the shape before the layer (and checked when given).
``validate_spec`` returns the normalised spec (every default filled in, pairs as lists) and a
per-layer table; errors are ``SpecError`` (a ValueError) naming the layer index, type and field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

LAYER_TYPES = (
    "conv2d",
    "maxpool2d",
    "avgpool2d",
    "linear",
    "relu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "flatten",
    "dropout",
    "batchnorm2d",
)


@dataclass(frozen=True)
class SpecLimits:
    """Caps checked during validation, so a hostile spec is refused before any allocation."""

    max_layers: int = 256
    max_parameters: int = 50_000_000
    max_activation_bytes: int = 256 << 20  # per sample, all layers' outputs, float32
    max_dim: int = 1 << 16  # any single dimension: channels, features, height, width
    max_classes: int = 100_000


DEFAULT_LIMITS = SpecLimits()


class SpecError(ValueError):
    """A spec the engine cannot build; ``field`` is a path such as ``layers[3].kernel_size``."""

    def __init__(self, message: str, field: str = "spec") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class LayerInfo:
    """One row of a model summary."""

    index: int
    type: str
    output_shape: tuple[int, ...]
    parameters: int
    macs: int
    receptive_field: tuple[int, int] | None  # (height, width) in input pixels; None once flat
    jump: tuple[int, int] | None  # distance in input pixels between neighbouring outputs


@dataclass(frozen=True)
class SpecSummary:
    """What validation learnt about a spec: per-layer rows and totals."""

    input_shape: tuple[int, ...]
    layers: list[LayerInfo] = field(default_factory=list)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.layers[-1].output_shape if self.layers else self.input_shape

    @property
    def parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def activation_bytes(self) -> int:
        """float32 bytes per sample of the input and every layer's output."""
        sizes = [math.prod(self.input_shape)] + [math.prod(r.output_shape) for r in self.layers]
        return 4 * sum(sizes)


# Allowed arguments per layer type: name -> (kind, default). kind: "int", "pair", "bool",
# "float", "pair_or_none". A default of REQUIRED must be given.
REQUIRED = object()
_ARGS: dict[str, dict[str, tuple[str, Any]]] = {
    "conv2d": {
        "out_channels": ("int", REQUIRED),
        "kernel_size": ("pair", REQUIRED),
        "stride": ("pair", 1),
        "padding": ("pair0", 0),
        "bias": ("bool", True),
        "in_channels": ("int", None),
    },
    "maxpool2d": {
        "kernel_size": ("pair", REQUIRED),
        "stride": ("pair", None),
        "padding": ("pair0", 0),
    },
    "avgpool2d": {
        "kernel_size": ("pair", REQUIRED),
        "stride": ("pair", None),
        "padding": ("pair0", 0),
    },
    "linear": {
        "out_features": ("int", REQUIRED),
        "bias": ("bool", True),
        "in_features": ("int", None),
    },
    "relu": {},
    "leaky_relu": {"negative_slope": ("float", 0.01)},
    "tanh": {},
    "sigmoid": {},
    "flatten": {},
    "dropout": {"p": ("float", 0.5)},
    "batchnorm2d": {
        "eps": ("float", 1e-5),
        "momentum": ("float", 0.1),
        "affine": ("bool", True),
        "num_features": ("int", None),
    },
}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_arg(where: str, path: str, name: str, kind: str, v: object) -> object:
    if kind == "bool":
        if not isinstance(v, bool):
            raise SpecError(f"{where}: {name} must be true or false, got {v!r}", path)
        return v
    if kind == "float":
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise SpecError(f"{where}: {name} must be a finite number, got {v!r}", path)
        return float(v)
    minimum = 0 if kind == "pair0" else 1
    if kind == "int":
        if not _is_int(v) or v < minimum:  # type: ignore[operator]
            raise SpecError(f"{where}: {name} must be an integer >= {minimum}, got {v!r}", path)
        return v
    # pairs: an int, or a list of two ints, as PyTorch's _pair accepts
    pair = [v, v] if _is_int(v) else v
    if (
        not isinstance(pair, list | tuple)
        or len(pair) != 2
        or not all(_is_int(p) and p >= minimum for p in pair)
    ):
        raise SpecError(
            f"{where}: {name} must be an integer >= {minimum} or a pair of them, got {v!r}", path
        )
    return [int(pair[0]), int(pair[1])]


def _normalise_layer(i: int, layer: object) -> dict[str, Any]:
    if not isinstance(layer, dict):
        raise SpecError(
            f"layer {i}: must be an object with a 'type', got {layer!r}", f"layers[{i}]"
        )
    kind = layer.get("type")
    if kind not in _ARGS:
        raise SpecError(
            f"layer {i}: unknown type {kind!r}; expected one of {', '.join(LAYER_TYPES)}",
            f"layers[{i}].type",
        )
    where = f"layer {i} ({kind})"
    allowed = _ARGS[kind]
    unknown = sorted(set(layer) - set(allowed) - {"type"})
    if unknown:
        known = ", ".join(allowed) or "none"
        raise SpecError(
            f"{where}: unknown argument {unknown[0]!r}; accepted: {known}",
            f"layers[{i}].{unknown[0]}",
        )
    out: dict[str, Any] = {"type": kind}
    for name, (arg_kind, default) in allowed.items():
        path = f"layers[{i}].{name}"
        if name not in layer or layer[name] is None:
            if default is REQUIRED:
                raise SpecError(f"{where}: {name} is required", path)
            out[name] = default
            if default is not None and arg_kind.startswith("pair"):
                out[name] = [default, default]
            continue
        out[name] = _check_arg(where, path, name, arg_kind, layer[name])
    return out


def _check_window(
    where: str, path: str, kh: int, kw: int, h: int, w: int, ph: int, pw: int
) -> None:
    if kh > h + 2 * ph or kw > w + 2 * pw:
        raise SpecError(
            f"{where}: kernel {kh}x{kw} is larger than its padded input {h + 2 * ph}x{w + 2 * pw}",
            path,
        )


def _infer(
    i: int, layer: dict[str, Any], shape: tuple[int, ...], rf: tuple[int, int, int, int] | None
) -> tuple[tuple[int, ...], int, int, tuple[int, int, int, int] | None]:
    """Return (output shape, parameters, MACs, receptive field state) of one layer."""
    kind = layer["type"]
    where = f"layer {i} ({kind})"
    spatial = kind in ("conv2d", "maxpool2d", "avgpool2d", "batchnorm2d")
    if spatial and len(shape) != 3:
        raise SpecError(
            f"{where}: expects an image input (C, H, W), got {tuple(shape)}; "
            "it cannot follow flatten or linear",
            f"layers[{i}]",
        )
    if kind == "conv2d":
        c, h, w = shape
        if layer["in_channels"] is not None and layer["in_channels"] != c:
            raise SpecError(
                f"{where}: in_channels is {layer['in_channels']} but its input has {c} channels",
                f"layers[{i}].in_channels",
            )
        layer["in_channels"] = c
        (kh, kw), (sh, sw), (ph, pw) = layer["kernel_size"], layer["stride"], layer["padding"]
        _check_window(where, f"layers[{i}].kernel_size", kh, kw, h, w, ph, pw)
        k = layer["out_channels"]
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        params = k * (kh * kw * c + (1 if layer["bias"] else 0))
        macs = k * oh * ow * c * kh * kw
        return (k, oh, ow), params, macs, _grow(rf, kh, kw, sh, sw)
    if kind in ("maxpool2d", "avgpool2d"):
        c, h, w = shape
        if layer["stride"] is None:
            layer["stride"] = list(layer["kernel_size"])
        (kh, kw), (sh, sw), (ph, pw) = layer["kernel_size"], layer["stride"], layer["padding"]
        if 2 * ph > kh or 2 * pw > kw:
            raise SpecError(
                f"{where}: padding {ph}x{pw} must be at most half the kernel {kh}x{kw}",
                f"layers[{i}].padding",
            )
        _check_window(where, f"layers[{i}].kernel_size", kh, kw, h, w, ph, pw)
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        return (c, oh, ow), 0, 0, _grow(rf, kh, kw, sh, sw)
    if kind == "batchnorm2d":
        c = shape[0]
        if layer["num_features"] is not None and layer["num_features"] != c:
            raise SpecError(
                f"{where}: num_features is {layer['num_features']} but its input has {c} channels",
                f"layers[{i}].num_features",
            )
        layer["num_features"] = c
        if not layer["eps"] > 0:
            raise SpecError(f"{where}: eps must be > 0, got {layer['eps']}", f"layers[{i}].eps")
        if not 0 <= layer["momentum"] <= 1:
            raise SpecError(
                f"{where}: momentum must be in [0, 1], got {layer['momentum']}",
                f"layers[{i}].momentum",
            )
        return shape, (2 * c if layer["affine"] else 0), 0, rf
    if kind == "linear":
        if len(shape) != 1:
            raise SpecError(
                f"{where}: expects a flat input (features,), got {tuple(shape)}; "
                "add a flatten layer before it",
                f"layers[{i}]",
            )
        f = shape[0]
        if layer["in_features"] is not None and layer["in_features"] != f:
            raise SpecError(
                f"{where}: in_features is {layer['in_features']} but its input has {f} features",
                f"layers[{i}].in_features",
            )
        layer["in_features"] = f
        o = layer["out_features"]
        return (o,), o * f + (o if layer["bias"] else 0), o * f, None
    if kind == "flatten":
        return (math.prod(shape),), 0, 0, None
    if kind == "dropout" and not 0 <= layer["p"] <= 1:
        raise SpecError(f"{where}: p must be in [0, 1], got {layer['p']}", f"layers[{i}].p")
    return shape, 0, 0, rf  # elementwise layers keep the shape


def _grow(
    rf: tuple[int, int, int, int] | None, kh: int, kw: int, sh: int, sw: int
) -> tuple[int, int, int, int] | None:
    """Receptive field recurrence: r' = r + (k - 1) * j, j' = j * s, per axis."""
    if rf is None:
        return None
    rh, rw, jh, jw = rf
    return rh + (kh - 1) * jh, rw + (kw - 1) * jw, jh * sh, jw * sw


def validate_spec(
    spec: object, limits: SpecLimits = DEFAULT_LIMITS
) -> tuple[dict[str, Any], SpecSummary]:
    """Check a spec end to end; return (normalised spec, summary). Raises SpecError."""
    if not isinstance(spec, dict):
        raise SpecError(f"spec must be an object with input_shape and layers, got {spec!r}")
    unknown = sorted(set(spec) - {"input_shape", "layers"})
    if unknown:
        raise SpecError(
            f"spec: unknown key {unknown[0]!r}; accepted: input_shape, layers", unknown[0]
        )
    shape = spec.get("input_shape")
    if (
        not isinstance(shape, list | tuple)
        or len(shape) != 3
        or not all(_is_int(d) and d >= 1 for d in shape)
    ):
        raise SpecError(
            f"input_shape must be three positive integers [C, H, W], got {shape!r}", "input_shape"
        )
    layers = spec.get("layers")
    if not isinstance(layers, list | tuple) or not layers:
        raise SpecError("layers must be a non-empty list", "layers")
    if len(layers) > limits.max_layers:
        raise SpecError(
            f"spec has {len(layers)} layers; the limit is {limits.max_layers}", "layers"
        )
    in_shape = tuple(int(d) for d in shape)
    _check_dims("input_shape", "input_shape", in_shape, limits)
    normalised = [_normalise_layer(i, layer) for i, layer in enumerate(layers)]
    rows: list[LayerInfo] = []
    cur: tuple[int, ...] = in_shape
    rf: tuple[int, int, int, int] | None = (1, 1, 1, 1)
    params = 0
    activations = math.prod(in_shape)
    for i, layer in enumerate(normalised):
        for name in ("out_channels", "out_features"):
            if name in layer and layer[name] > limits.max_dim:
                raise SpecError(
                    f"layer {i} ({layer['type']}): {name} {layer[name]} exceeds the limit "
                    f"{limits.max_dim}",
                    f"layers[{i}].{name}",
                )
        cur, p, macs, rf = _infer(i, layer, cur, rf)
        where = f"layer {i} ({layer['type']})"
        _check_dims(where, f"layers[{i}]", cur, limits)
        params += p
        if params > limits.max_parameters:
            raise SpecError(
                f"{where}: the model reaches {params:,} parameters; the limit is "
                f"{limits.max_parameters:,}",
                f"layers[{i}]",
            )
        activations += math.prod(cur)
        if 4 * activations > limits.max_activation_bytes:
            raise SpecError(
                f"{where}: activations reach {4 * activations:,} bytes per sample; the limit is "
                f"{limits.max_activation_bytes:,}",
                f"layers[{i}]",
            )
        rows.append(
            LayerInfo(
                i, layer["type"], cur, p, macs, rf[:2] if rf else None, rf[2:] if rf else None
            )
        )
    return {"input_shape": list(in_shape), "layers": normalised}, SpecSummary(in_shape, rows)


def _check_dims(where: str, path: str, shape: tuple[int, ...], limits: SpecLimits) -> None:
    for d in shape:
        if d < 1:
            raise SpecError(f"{where}: output shape {shape} has an empty dimension", path)
        if d > limits.max_dim and len(shape) > 1:
            raise SpecError(
                f"{where}: dimension {d} of {shape} exceeds the limit {limits.max_dim}", path
            )


def num_classes(summary: SpecSummary) -> int:
    """Classes a spec scores: its output must be a flat vector of logits."""
    out = summary.output_shape
    if len(out) != 1:
        raise SpecError(
            f"the model's output {out} is not a vector of class scores; end with flatten/linear",
            "layers",
        )
    return out[0]
