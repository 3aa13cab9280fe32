"""Sequential: initialisation, state_dict/load_state_dict, activations, astype, input checks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import stats

from cnnd.core import Sequential

SPEC: dict[str, Any] = {
    "input_shape": [3, 12, 12],
    "layers": [
        {"type": "conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm2d"},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "conv2d", "out_channels": 16, "kernel_size": [3, 2]},
        {"type": "relu"},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.5},
        {"type": "linear", "out_features": 32},
        {"type": "relu"},
        {"type": "linear", "out_features": 4, "bias": False},
    ],
}


def test_same_seed_same_weights_different_seed_different() -> None:
    """Initialisation is a pure function of the seed."""
    a = Sequential.from_spec(SPEC, seed=7).state_dict()
    b = Sequential.from_spec(SPEC, seed=7).state_dict()
    c = Sequential.from_spec(SPEC, seed=8).state_dict()
    assert list(a) == list(b) == list(c)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].dtype == b[k].dtype
    drawn = [k for k in a if k.endswith(("weight", "bias")) and not k.startswith("1.")]
    assert drawn == ["0.weight", "0.bias", "4.weight", "4.bias", "8.weight", "8.bias", "10.weight"]
    for k in drawn:
        assert not np.array_equal(a[k], c[k]), k


def test_initial_weights_follow_pytorch_bounds() -> None:
    """Weights and biases lie within PyTorch's 1/sqrt(fan_in); batchnorm starts at identity."""
    model = Sequential.from_spec(SPEC, seed=0)
    state = model.state_dict()
    fan_in = {"0": 3 * 3 * 3, "4": 8 * 3 * 2, "8": 16 * 4 * 5, "10": 32}
    for layer, fan in fan_in.items():
        bound = 1 / math.sqrt(fan)
        for kind in ("weight", "bias"):
            if f"{layer}.{kind}" not in state:
                continue
            w = state[f"{layer}.{kind}"]
            assert w.dtype == np.float32
            assert np.abs(w).max() <= bound
            if w.size >= 100:  # a large sample fills most of the interval
                assert np.abs(w).max() > 0.9 * bound
    np.testing.assert_array_equal(state["1.weight"], np.ones(8, np.float32))
    np.testing.assert_array_equal(state["1.bias"], np.zeros(8, np.float32))
    np.testing.assert_array_equal(state["1.running_mean"], np.zeros(8, np.float32))
    np.testing.assert_array_equal(state["1.running_var"], np.ones(8, np.float32))
    assert state["1.num_batches_tracked"].shape == () and state["1.num_batches_tracked"] == 0


def test_initial_weights_are_uniform() -> None:
    """A large linear layer's weights look like U(-b, b): mean ~0, variance ~b^2/3, and a
    Kolmogorov-Smirnov test does not reject uniformity."""
    spec = {
        "input_shape": [1, 20, 20],
        "layers": [{"type": "flatten"}, {"type": "linear", "out_features": 300}],
    }
    w = Sequential.from_spec(spec, seed=3).state_dict()["1.weight"].astype(np.float64).ravel()
    b = 1 / math.sqrt(400)
    assert abs(w.mean()) < 0.01 * b
    assert abs(w.var() / (b * b / 3) - 1) < 0.02
    assert stats.kstest(w, stats.uniform(loc=-b, scale=2 * b).cdf).pvalue > 1e-3
    # Not a degenerate draw: every decile of the interval is used about equally.
    counts, _ = np.histogram(w, bins=10, range=(-b, b))
    assert counts.min() > 0.9 * w.size / 10


def test_state_dict_names_order_and_copies() -> None:
    """state_dict follows torch.nn.Sequential's names and order and returns copies."""
    model = Sequential.from_spec(SPEC, seed=1)
    state = model.state_dict()
    assert list(state) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked", "4.weight", "4.bias", "8.weight", "8.bias", "10.weight",
    ]  # fmt: skip
    state["0.weight"][:] = 0
    assert np.abs(model.state_dict()["0.weight"]).max() > 0
    assert set(model.named_parameters()) == set(state) - {
        "1.running_mean", "1.running_var", "1.num_batches_tracked"
    }  # fmt: skip


def test_load_state_dict_round_trip_changes_outputs(rng: np.random.Generator) -> None:
    """Loading another model's state makes the outputs identical to that model's."""
    a = Sequential.from_spec(SPEC, seed=1)
    b = Sequential.from_spec(SPEC, seed=2)
    x = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    assert not np.array_equal(a.forward(x), b.forward(x))
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.forward(x), b.forward(x))


def _corrupt(state: dict[str, np.ndarray], name: str, value: Any) -> dict[str, np.ndarray]:
    """All arrays changed (so a partial load would show), and ``name`` set to ``value``."""
    out: dict[str, np.ndarray] = {k: v + 1 for k, v in state.items()}
    out[name] = value
    return out


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda s: {k: v for k, v in s.items() if k != "10.weight"}, r"missing \['10.weight'\]"),
        (lambda s: s | {"11.weight": np.zeros(3, np.float32)}, r"unexpected \['11.weight'\]"),
        (
            lambda s: {("0.w" if k == "0.weight" else k): v for k, v in s.items()},
            r"missing \['0.weight'\], unexpected \['0.w'\]",
        ),
        (
            lambda s: _corrupt(s, "10.weight", np.zeros((4, 33), np.float32)),
            r"state_dict\['10.weight'\] has shape \(4, 33\); the model expects \(4, 32\)",
        ),
        (
            lambda s: _corrupt(s, "10.weight", np.zeros((32, 4), np.float32)),
            r"has shape \(32, 4\)",
        ),
        (
            lambda s: _corrupt(s, "1.num_batches_tracked", np.zeros(1, np.int64)),
            r"num_batches_tracked'\] has shape \(1,\)",
        ),
        (
            lambda s: _corrupt(s, "10.weight", np.full((4, 32), np.nan, np.float32)),
            r"state_dict\['10.weight'\] holds NaN or infinite values",
        ),
        (
            lambda s: _corrupt(s, "1.running_var", np.array([1, 1, 1, np.inf, 1, 1, 1, 1])),
            r"running_var'\] holds NaN or infinite values",
        ),
        (
            lambda s: _corrupt(s, "10.weight", np.full((4, 32), "a")),
            r"non-numeric dtype",
        ),
        (
            lambda s: _corrupt(s, "10.weight", np.empty((4, 32), object)),
            r"non-numeric dtype",
        ),
    ],
    ids=["missing", "unexpected", "renamed", "shape", "transposed", "scalar-shape", "nan",
         "inf", "str", "object"],
)  # fmt: skip
def test_load_state_dict_rejects_bad_state_and_changes_nothing(
    mutate: Any, pattern: str, rng: np.random.Generator
) -> None:
    """Wrong names, shapes, NaN/inf or non-numeric arrays raise ValueError and leave every
    parameter and buffer as it was (the last entry is the bad one: nothing is half-loaded)."""
    model = Sequential.from_spec(SPEC, seed=1)
    before = model.state_dict()
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    y = model.forward(x)
    with pytest.raises(ValueError, match=pattern):
        model.load_state_dict(mutate(model.state_dict()))
    after = model.state_dict()
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v)
    np.testing.assert_array_equal(model.forward(x), y)


def test_astype_float64_is_a_separate_copy(rng: np.random.Generator) -> None:
    """astype(float64) computes in float64, agrees with float32 to float32 precision, and
    leaves the original model untouched."""
    model = Sequential.from_spec(SPEC, seed=4)
    double = model.astype(np.float64)
    assert double.dtype == np.float64 and model.dtype == np.float32
    x = rng.standard_normal((3, 3, 12, 12))
    y64 = double.forward(x)
    assert y64.dtype == np.float64
    np.testing.assert_allclose(model.forward(x.astype(np.float32)), y64, rtol=1e-4, atol=1e-5)
    double.named_parameters()["0.weight"][:] = 0
    assert np.abs(model.named_parameters()["0.weight"]).max() > 0
    with pytest.raises(ValueError, match="dtype is float32; the model computes in float64"):
        double.forward(x.astype(np.float32))


def test_input_shape_and_dtype_are_checked() -> None:
    """forward refuses inputs of the wrong shape or dtype with a clear ValueError."""
    model = Sequential.from_spec(SPEC)
    with pytest.raises(ValueError, match=r"input has shape \(2, 3, 12, 11\); the model expects "
                       r"\(N, 3, 12, 12\)"):  # fmt: skip
        model.forward(np.zeros((2, 3, 12, 11), np.float32))
    with pytest.raises(ValueError, match="input has shape"):
        model.forward(np.zeros((3, 12, 12), np.float32))
    with pytest.raises(ValueError, match="input dtype is float64"):
        model.forward(np.zeros((2, 3, 12, 12)))


def test_activations_show_each_layer_unfused(rng: np.random.Generator) -> None:
    """activations() returns every layer's output in evaluation mode; a conv's own output is
    seen before the ReLU that follows it, and fusion is restored afterwards."""
    model = Sequential.from_spec(SPEC, seed=5)
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    outs = model.activations(x)
    assert [o.shape[1:] for o in outs] == [r.output_shape for r in model.summary_info.layers]
    assert (outs[4] < 0).any(), "conv 4 is followed by a ReLU but must be shown before it"
    np.testing.assert_array_equal(outs[5], np.maximum(outs[4], 0))
    np.testing.assert_array_equal(outs[-1], model.forward(x))
    assert model.layers[4].fuse_relu and model.layers[5].fused
    assert model.layers[8].fuse_relu and model.layers[9].fused


def test_eval_forward_is_deterministic_and_train_differs_with_dropout(
    rng: np.random.Generator,
) -> None:
    """Evaluation ignores dropout and uses running statistics; training does not."""
    model = Sequential.from_spec(SPEC, seed=5)
    x = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
    np.testing.assert_array_equal(model.forward(x), model.forward(x))
    assert not np.allclose(model.forward(x, train=True), model.forward(x))


def test_batch_of_one_and_empty_batch() -> None:
    """A single sample works in evaluation mode; an empty batch flows through every layer
    (conv, batchnorm, pools, flatten, linear) to an empty (0, classes) output."""
    model = Sequential.from_spec(SPEC, seed=0)
    assert model.forward(np.ones((1, 3, 12, 12), np.float32)).shape == (1, 4)
    assert model.forward(np.ones((0, 3, 12, 12), np.float32)).shape == (0, 4)
