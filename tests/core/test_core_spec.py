"""Spec validation (validate_spec / Sequential.from_spec) and the model summary.

Errors are SpecError (a ValueError) naming the layer index, type and field; hostile specs are
refused quickly and before anything large is allocated.
"""

from __future__ import annotations

import copy
import re
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cnnd.core import Sequential, SpecError, SpecLimits, validate_spec
from cnnd.core.spec import num_classes


def spec_of(*layers: dict[str, Any], input_shape: tuple[int, ...] = (1, 8, 8)) -> dict[str, Any]:
    return {"input_shape": list(input_shape), "layers": list(layers)}


def refused(spec: object, pattern: str, field: str | None = None, **kw: Any) -> SpecError:
    """Assert that validation and Sequential.from_spec both raise SpecError matching pattern."""
    with pytest.raises(SpecError, match=pattern) as info:
        validate_spec(spec, **kw)
    if field is not None:
        assert info.value.field == field
    with pytest.raises(SpecError, match=pattern):
        Sequential.from_spec(spec, **kw)
    assert isinstance(info.value, ValueError)
    return info.value


def test_kernel_larger_than_padded_input_exact_message() -> None:
    """The documented example: a 5x5 kernel on a 4x4 map is refused with this exact text."""
    spec = spec_of(
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3},  # 10x10 -> 8x8
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},  # -> 4x4
        {"type": "conv2d", "out_channels": 8, "kernel_size": 5},
        {"type": "flatten"},
        {"type": "linear", "out_features": 3},
    )
    spec["input_shape"] = [1, 10, 10]
    message = "layer 3 (conv2d): kernel 5x5 is larger than its padded input 4x4"
    err = refused(spec, f"^{re.escape(message)}$")
    assert str(err) == message and err.field == "layers[3].kernel_size"
    # Either axis alone can be too small.
    wide = spec_of({"type": "conv2d", "out_channels": 2, "kernel_size": [2, 5], "padding": [0, 1]},
                   input_shape=(1, 8, 2))  # fmt: skip
    refused(wide, r"^layer 0 \(conv2d\): kernel 2x5 is larger than its padded input 8x4$")
    # The same kernel fits once padding makes the input 6x6.
    spec["layers"][3]["padding"] = 1
    assert validate_spec(spec)[1].layers[3].output_shape == (8, 2, 2)


@pytest.mark.parametrize(
    ("layers", "pattern", "field"),
    [
        (
            [{"type": "conv3d", "out_channels": 2}],
            r"layer 0: unknown type 'conv3d'",
            "layers[0].type",
        ),
        ([{"out_channels": 2}], r"layer 0: unknown type None", "layers[0].type"),
        (["relu"], r"layer 0: must be an object", "layers[0]"),
        (
            [{"type": "conv2d", "out_channels": 2, "kernel_size": 3, "dilation": 2}],
            r"layer 0 \(conv2d\): unknown argument 'dilation'",
            "layers[0].dilation",
        ),
        (
            [{"type": "relu", "inplace": True}],
            r"layer 0 \(relu\): unknown argument 'inplace'; accepted: none",
            "layers[0].inplace",
        ),
        (
            [{"type": "conv2d", "kernel_size": 3}],
            r"layer 0 \(conv2d\): out_channels is required",
            "layers[0].out_channels",
        ),
        (
            [{"type": "flatten"}, {"type": "linear"}],
            r"layer 1 \(linear\): out_features is required",
            "layers[1].out_features",
        ),
        (
            [{"type": "maxpool2d"}],
            r"layer 0 \(maxpool2d\): kernel_size is required",
            "layers[0].kernel_size",
        ),
        (
            [{"type": "conv2d", "out_channels": True, "kernel_size": 3}],
            r"out_channels must be an integer >= 1, got True",
            "layers[0].out_channels",
        ),
        (
            [{"type": "conv2d", "out_channels": 2, "kernel_size": [3, False]}],
            r"kernel_size must be an integer >= 1 or a pair",
            "layers[0].kernel_size",
        ),
        (
            [{"type": "conv2d", "out_channels": 2, "kernel_size": 3, "bias": 1}],
            r"bias must be true or false, got 1",
            "layers[0].bias",
        ),
        (
            [{"type": "conv2d", "out_channels": 2.0, "kernel_size": 3}],
            r"out_channels must be an integer",
            "layers[0].out_channels",
        ),
        (
            [{"type": "conv2d", "out_channels": 0, "kernel_size": 3}],
            r"out_channels must be an integer >= 1, got 0",
            "layers[0].out_channels",
        ),
        (
            [{"type": "conv2d", "out_channels": 2, "kernel_size": -3}],
            r"kernel_size must be an integer >= 1",
            "layers[0].kernel_size",
        ),
        (
            [{"type": "conv2d", "out_channels": 2, "kernel_size": 3, "stride": 0}],
            r"stride must be an integer >= 1",
            "layers[0].stride",
        ),
        (
            [{"type": "conv2d", "out_channels": 2, "kernel_size": 3, "padding": [1, -1]}],
            r"padding must be an integer >= 0",
            "layers[0].padding",
        ),
        (
            [{"type": "conv2d", "out_channels": 2, "kernel_size": [3, 3, 3]}],
            r"kernel_size must be an integer >= 1 or a pair of them",
            "layers[0].kernel_size",
        ),
        (
            [{"type": "flatten"}, {"type": "linear", "out_features": -4}],
            r"out_features must be an integer >= 1, got -4",
            "layers[1].out_features",
        ),
        (
            [{"type": "dropout", "p": 1.5}],
            r"layer 0 \(dropout\): p must be in \[0, 1\], got 1.5",
            "layers[0].p",
        ),
        (
            [{"type": "dropout", "p": float("nan")}],
            r"p must be a finite number",
            "layers[0].p",
        ),
        (
            [{"type": "batchnorm2d", "eps": 0}],
            r"eps must be > 0",
            "layers[0].eps",
        ),
        (
            [{"type": "maxpool2d", "kernel_size": 2, "padding": 2}],
            r"padding 2x2 must be at most half the kernel 2x2",
            "layers[0].padding",
        ),
        (
            [{"type": "conv2d", "out_channels": 2, "kernel_size": 3, "in_channels": 3}],
            r"layer 0 \(conv2d\): in_channels is 3 but its input has 1 channels",
            "layers[0].in_channels",
        ),
        (
            [{"type": "batchnorm2d", "num_features": 2}],
            r"num_features is 2 but its input has 1 channels",
            "layers[0].num_features",
        ),
        (
            [{"type": "flatten"}, {"type": "linear", "out_features": 3, "in_features": 65}],
            r"layer 1 \(linear\): in_features is 65 but its input has 64 features",
            "layers[1].in_features",
        ),
        (
            [
                {"type": "conv2d", "out_channels": 2, "kernel_size": 3},
                {"type": "linear", "out_features": 3},
            ],
            r"layer 1 \(linear\): expects a flat input .* add a flatten layer before it",
            "layers[1]",
        ),
        (
            [{"type": "flatten"}, {"type": "conv2d", "out_channels": 2, "kernel_size": 1}],
            r"layer 1 \(conv2d\): expects an image input",
            "layers[1]",
        ),
        (
            [
                {"type": "conv2d", "out_channels": 2, "kernel_size": 3, "stride": 9},
                {"type": "maxpool2d", "kernel_size": 2},
            ],
            r"layer 1 \(maxpool2d\): kernel 2x2 is larger than its padded input 1x1",
            "layers[1].kernel_size",
        ),
    ],
)
def test_invalid_layers_are_refused(layers: list[Any], pattern: str, field: str) -> None:
    """Each malformed layer gives a SpecError naming the layer, its type and the field."""
    refused(spec_of(*layers), pattern, field)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        (None, r"spec must be an object"),
        ({"input_shape": [1, 8, 8]}, r"layers must be a non-empty list"),
        ({"input_shape": [1, 8, 8], "layers": []}, r"layers must be a non-empty list"),
        ({"input_shape": [1, 8], "layers": [{"type": "relu"}]}, r"input_shape must be three"),
        ({"input_shape": [0, 8, 8], "layers": [{"type": "relu"}]}, r"input_shape must be three"),
        ({"input_shape": [1, -8, 8], "layers": [{"type": "relu"}]}, r"input_shape must be three"),
        ({"input_shape": [True, 8, 8], "layers": [{"type": "relu"}]}, r"input_shape must be three"),
        (
            {"input_shape": [1, 8, 8], "layers": [{"type": "relu"}], "optimizer": "sgd"},
            r"unknown key 'optimizer'",
        ),
    ],
)
def test_invalid_top_level_is_refused(spec: object, pattern: str) -> None:
    """The spec object, its input_shape and its layer list are checked too."""
    refused(spec, pattern)


def _quick_and_small(build: Callable[[], object]) -> SpecError:
    """Run build() expecting a SpecError, in well under a second, allocating under 1 MiB."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(SpecError) as info:
            build()
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5, f"took {elapsed:.2f} s"
    assert peak < 1 << 20, f"allocated {peak:,} bytes"
    return info.value


@pytest.mark.parametrize(
    "spec",
    [
        spec_of({"type": "conv2d", "out_channels": 2**31, "kernel_size": 3}),
        spec_of({"type": "flatten"}, {"type": "linear", "out_features": 2**31}),
        spec_of({"type": "relu"}, input_shape=(1, 2**31, 8)),
        spec_of({"type": "conv2d", "out_channels": 2, "kernel_size": 3, "padding": 2**31}),
        spec_of(
            {"type": "conv2d", "out_channels": 2**16, "kernel_size": 1},
            {"type": "conv2d", "out_channels": 2**16, "kernel_size": 1},
        ),
        spec_of({"type": "flatten"}, {"type": "linear", "out_features": 60_000},
                {"type": "linear", "out_features": 60_000}),
        spec_of({"type": "conv2d", "out_channels": 4096, "kernel_size": 1},
                input_shape=(1, 1024, 1024)),
    ],
    ids=["conv-width-2^31", "linear-width-2^31", "input-2^31", "padding-2^31",
         "params-conv", "params-linear", "activations"],
)  # fmt: skip
def test_huge_specs_fail_fast_without_allocating(spec: dict[str, Any]) -> None:
    """Widths of 2**31, billions of parameters or gigabytes of activations are refused by
    arithmetic on Python ints, before any array exists."""
    _quick_and_small(lambda: Sequential.from_spec(spec))


def test_ten_thousand_layers_are_refused_fast() -> None:
    """10**4 layers exceed max_layers and are refused before any layer is looked at."""
    spec = spec_of(*([{"type": "relu"}] * 10**4))
    err = _quick_and_small(lambda: Sequential.from_spec(spec))
    assert str(err) == "spec has 10000 layers; the limit is 256"
    assert validate_spec(spec, SpecLimits(max_layers=10**4))[1].output_shape == (1, 8, 8)


def test_parameter_limit() -> None:
    """The parameter count is checked against SpecLimits.max_parameters, at the layer that
    crosses it; exactly the limit is allowed."""
    spec = spec_of({"type": "flatten"}, {"type": "linear", "out_features": 10})  # 650 params
    assert validate_spec(spec, SpecLimits(max_parameters=650))[1].parameters == 650
    refused(
        spec,
        r"layer 1 \(linear\): the model reaches 650 parameters; the limit is 649",
        "layers[1]",
        limits=SpecLimits(max_parameters=649),
    )
    big = spec_of({"type": "flatten"}, {"type": "linear", "out_features": 60_000},
                  input_shape=(1, 100, 100))  # fmt: skip
    refused(big, r"600,060,000 parameters; the limit is 50,000,000")


def test_in_channels_and_in_features_are_inferred() -> None:
    """in_channels / num_features / in_features are filled from the shape before the layer;
    defaults are filled in and pairs normalised to lists."""
    spec = spec_of(
        {"type": "conv2d", "out_channels": 5, "kernel_size": [3, 2], "stride": 2},
        {"type": "batchnorm2d"},
        {"type": "avgpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 7},
        {"type": "linear", "out_features": 3, "in_features": 7},
        input_shape=(3, 11, 12),
    )
    original = copy.deepcopy(spec)
    normalised, summary = validate_spec(spec)
    assert spec == original, "validation must not modify its argument"
    conv, bn, pool, _, lin1, lin2 = normalised["layers"]
    assert conv == {
        "type": "conv2d", "out_channels": 5, "kernel_size": [3, 2], "stride": [2, 2],
        "padding": [0, 0], "bias": True, "in_channels": 3,
    }  # fmt: skip
    assert bn["num_features"] == 5 and bn["eps"] == 1e-5 and bn["momentum"] == 0.1
    assert pool["stride"] == [2, 2] and pool["padding"] == [0, 0]
    # conv: (11-3)//2+1 = 5, (12-2)//2+1 = 6; pool: 2x3; flatten: 30
    assert [r.output_shape for r in summary.layers] == [
        (5, 5, 6), (5, 5, 6), (5, 2, 3), (30,), (7,), (3,)
    ]  # fmt: skip
    assert lin1["in_features"] == 30 and lin2["in_features"] == 7
    model = Sequential.from_spec(spec)
    assert model.state_dict()["0.weight"].shape == (5, 3, 3, 2)
    assert model.state_dict()["4.weight"].shape == (7, 30)
    assert validate_spec(normalised) == (normalised, summary), "normalising is idempotent"
    assert num_classes(summary) == 3


def test_num_classes_needs_a_flat_output() -> None:
    """A spec whose output is still an image scores no classes."""
    _, summary = validate_spec(spec_of({"type": "conv2d", "out_channels": 2, "kernel_size": 3}))
    with pytest.raises(SpecError, match="not a vector of class scores"):
        num_classes(summary)


def test_lenet5_summary(lenet5_spec: dict[str, Any]) -> None:
    """Per-layer output shapes, parameters N(k1*k2*C + 1), MACs and receptive fields (with
    their jumps) of LeNet-5 are the textbook values."""
    model = Sequential.from_spec(lenet5_spec)
    rows = model.summary_info.layers
    shapes = [r.output_shape for r in rows]
    assert shapes == [
        (6, 28, 28), (6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 10, 10), (16, 5, 5),
        (400,), (120,), (120,), (84,), (84,), (10,),
    ]  # fmt: skip
    params = [r.parameters for r in rows]
    assert params[0] == 6 * (5 * 5 * 1 + 1) == 156
    assert params[3] == 16 * (5 * 5 * 6 + 1) == 2416
    assert params[7] == 120 * 400 + 120
    assert params[9] == 84 * 120 + 84
    assert params[11] == 10 * 84 + 10
    assert sum(params) == model.num_parameters() == 61_706
    state = model.state_dict()
    assert sum(v.size for k, v in state.items()) == 61_706
    macs = [r.macs for r in rows]
    assert macs[0] == 6 * 28 * 28 * 25 == 117_600
    assert macs[3] == 16 * 10 * 10 * 150 == 240_000
    assert macs[7] == 48_000 and macs[9] == 10_080 and macs[11] == 840
    assert macs[2] == macs[1] == 0
    assert model.summary_info.macs == 416_520
    rf = [(r.receptive_field, r.jump) for r in rows[:6]]
    assert rf == [
        ((5, 5), (1, 1)), ((5, 5), (1, 1)), ((6, 6), (2, 2)),
        ((14, 14), (2, 2)), ((14, 14), (2, 2)), ((16, 16), (4, 4)),
    ]  # fmt: skip
    assert all(r.receptive_field is None and r.jump is None for r in rows[6:])
    text = model.summary()
    assert "14x14 (jump 2x2)" in text and "2,416" in text and "240,000" in text
    assert text.splitlines()[-1] == "input 1x32x32, 61,706 parameters, 416,520 MACs per sample"
    assert model.output_shape == (10,)


def test_receptive_field_with_padding_and_strided_conv() -> None:
    """Receptive field recurrence r' = r + (k - 1) j, j' = j s, per axis, for non-square
    kernels and strides; padding does not change it."""
    _, summary = validate_spec(
        spec_of(
            {"type": "conv2d", "out_channels": 2, "kernel_size": [3, 1], "stride": [2, 1],
             "padding": 1},
            {"type": "maxpool2d", "kernel_size": 3, "stride": 2, "padding": 1},
            {"type": "conv2d", "out_channels": 2, "kernel_size": 3, "padding": 1},
            input_shape=(1, 32, 32),
        )
    )  # fmt: skip
    assert [(r.receptive_field, r.jump) for r in summary.layers] == [
        ((3, 1), (2, 1)), ((7, 3), (4, 2)), ((15, 7), (4, 2))
    ]  # fmt: skip


def test_param_counts_match_allocations() -> None:
    """For every layer type the summary's parameter count equals the arrays allocated."""
    spec = spec_of(
        {"type": "conv2d", "out_channels": 4, "kernel_size": [3, 2], "bias": False},
        {"type": "batchnorm2d"},
        {"type": "leaky_relu"},
        {"type": "conv2d", "out_channels": 3, "kernel_size": 2},
        {"type": "batchnorm2d", "affine": False},
        {"type": "sigmoid"},
        {"type": "flatten"},
        {"type": "dropout"},
        {"type": "linear", "out_features": 5, "bias": False},
        {"type": "tanh"},
    )
    model = Sequential.from_spec(spec)
    for i, row in enumerate(model.summary_info.layers):
        assert row.parameters == sum(p.size for p in model.layers[i].params.values()), i
    assert model.num_parameters() == sum(p.size for p in model.named_parameters().values())
    assert np.dtype(model.dtype) == np.float32
