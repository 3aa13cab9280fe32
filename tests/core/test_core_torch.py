"""cnnd against PyTorch (float32): layers, a LeNet-style network, optimizers and schedules.

Forward values and every gradient must match torch.nn with rtol 1e-4, atol 1e-5; a state_dict
moves between cnnd.core.Sequential and torch.nn.Sequential unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cnnd.core import SGD, Adam, AdamW, Schedule, Sequential, kernels

torch = pytest.importorskip("torch")
nn = torch.nn

pytestmark = pytest.mark.torch
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    torch.set_num_threads(2)


def t(a: np.ndarray, grad: bool = False) -> Any:
    """A torch tensor holding a copy of ``a``."""
    return torch.tensor(np.array(a), requires_grad=grad)


def close(actual: np.ndarray, desired: Any) -> None:
    """cnnd result (NumPy) against torch result (tensor), with the float32 tolerances."""
    desired = desired.detach().numpy() if hasattr(desired, "detach") else desired
    assert actual.shape == desired.shape
    np.testing.assert_allclose(actual, desired, **TOL)


def compare_layer(
    layer: Any, module: Any, x: np.ndarray, train: bool, rng: np.random.Generator
) -> None:
    """Load cnnd's parameters into ``module``, then compare output, dx and parameter grads
    for L = sum(out * R)."""
    module.load_state_dict(
        {k: torch.from_numpy(v.copy()) for k, v in (layer.params | layer.buffers).items()}
    )
    module.train(train)
    module.zero_grad(set_to_none=True)
    y = layer.forward(x, train)
    r = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(r.copy(), True)
    tx = t(x, grad=True)
    ty = module(tx)
    (ty * t(r)).sum().backward()
    close(y, ty)
    close(dx, tx.grad)
    torch_grads = {k: p.grad for k, p in module.named_parameters()}
    assert set(layer.grads) == set(torch_grads)
    for name, g in torch_grads.items():
        close(layer.grads[name], g)


@pytest.mark.parametrize(
    ("entry", "module"),
    [
        (
            {"type": "conv2d", "out_channels": 4, "kernel_size": 3},
            lambda: nn.Conv2d(3, 4, 3),
        ),
        (
            {
                "type": "conv2d",
                "out_channels": 5,
                "kernel_size": [3, 2],
                "stride": [2, 1],
                "padding": [1, 2],
            },
            lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2)),
        ),
        (
            {
                "type": "conv2d",
                "out_channels": 2,
                "kernel_size": 4,
                "stride": 3,
                "padding": 2,
                "bias": False,
            },
            lambda: nn.Conv2d(3, 2, 4, stride=3, padding=2, bias=False),
        ),
    ],
    ids=["plain", "stride-pad-pairs", "no-bias"],
)
def test_conv2d_matches_torch(
    entry: dict[str, Any], module: Any, make_layer: Any, rng: np.random.Generator
) -> None:
    """conv2d forward, dx, dweight, dbias equal nn.Conv2d's, with stride/padding/bias=False."""
    layer = make_layer(entry, (3, 9, 8), np.float32)
    compare_layer(layer, module(), rng.standard_normal((5, 3, 9, 8)).astype(np.float32), True, rng)


@pytest.mark.parametrize(
    ("entry", "module"),
    [
        ({"type": "maxpool2d", "kernel_size": 2}, lambda: nn.MaxPool2d(2)),
        (
            {"type": "maxpool2d", "kernel_size": 3, "stride": 2, "padding": 1},
            lambda: nn.MaxPool2d(3, stride=2, padding=1),
        ),
        (
            {"type": "maxpool2d", "kernel_size": [2, 3], "stride": [1, 2], "padding": [1, 1]},
            lambda: nn.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 1)),
        ),
        ({"type": "avgpool2d", "kernel_size": 2}, lambda: nn.AvgPool2d(2)),
        (
            {"type": "avgpool2d", "kernel_size": 3, "stride": 2, "padding": 1},
            lambda: nn.AvgPool2d(3, stride=2, padding=1),
        ),
        (
            {"type": "avgpool2d", "kernel_size": [3, 2], "stride": [2, 1], "padding": [1, 1]},
            lambda: nn.AvgPool2d((3, 2), stride=(2, 1), padding=(1, 1)),
        ),
    ],
    ids=["max2", "max3-s2-p1", "max23-s12-p1", "avg2", "avg3-s2-p1", "avg32-s21-p1"],
)
@pytest.mark.parametrize("ties", [False, True])
def test_pooling_matches_torch(
    entry: dict[str, Any], module: Any, ties: bool, make_layer: Any, rng: np.random.Generator
) -> None:
    """Pooling forward and backward equal nn.MaxPool2d / nn.AvgPool2d; with ties, max pooling
    sends the gradient to the same element as PyTorch does."""
    shape = (4, 2, 7, 6)
    x = rng.integers(-2, 3, shape) if ties else rng.standard_normal(shape)
    compare_layer(
        make_layer(entry, shape[1:], np.float32), module(), x.astype(np.float32), True, rng
    )


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(bias: bool, make_layer: Any, rng: np.random.Generator) -> None:
    """linear forward, dx, dweight, dbias equal nn.Linear's."""
    layer = make_layer({"type": "linear", "out_features": 6, "bias": bias}, (11,), np.float32)
    x = rng.standard_normal((7, 11)).astype(np.float32)
    compare_layer(layer, nn.Linear(11, 6, bias=bias), x, True, rng)


@pytest.mark.parametrize(
    ("entry", "module"),
    [
        ({"type": "relu"}, nn.ReLU),
        ({"type": "leaky_relu", "negative_slope": 0.2}, lambda: nn.LeakyReLU(0.2)),
        ({"type": "leaky_relu"}, nn.LeakyReLU),
        ({"type": "tanh"}, nn.Tanh),
        ({"type": "sigmoid"}, nn.Sigmoid),
        ({"type": "flatten"}, nn.Flatten),
    ],
    ids=["relu", "leaky_relu-0.2", "leaky_relu-default", "tanh", "sigmoid", "flatten"],
)
def test_elementwise_matches_torch(
    entry: dict[str, Any], module: Any, make_layer: Any, rng: np.random.Generator
) -> None:
    """Activations (and flatten) forward and backward equal torch's, defaults included."""
    x = (3 * rng.standard_normal((4, 3, 5, 5))).astype(np.float32)
    compare_layer(make_layer(entry, (3, 5, 5), np.float32), module(), x, True, rng)


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm2d_matches_torch(affine: bool, make_layer: Any, rng: np.random.Generator) -> None:
    """batchnorm2d equals nn.BatchNorm2d in training (output, gradients, running statistics
    and num_batches_tracked after three batches) and then in evaluation mode."""
    entry = {"type": "batchnorm2d", "momentum": 0.3, "eps": 1e-3, "affine": affine}
    layer = make_layer(entry, (3, 4, 5), np.float32)
    module = nn.BatchNorm2d(3, eps=1e-3, momentum=0.3, affine=affine)
    if affine:
        layer.params["weight"][:] = rng.uniform(0.5, 2, 3)
        layer.params["bias"][:] = rng.standard_normal(3)
    for _ in range(3):
        x = (2 * rng.standard_normal((6, 3, 4, 5)) + 1).astype(np.float32)
        compare_layer(layer, module, x, True, rng)
        # compare_layer reloads the module from cnnd's state before each forward, so check
        # the running statistics both implementations reached from the same start.
        for name, buf in module.named_buffers():
            close(np.asarray(layer.buffers[name], dtype=buf.numpy().dtype), buf)
    assert int(layer.buffers["num_batches_tracked"]) == 3
    x = (2 * rng.standard_normal((6, 3, 4, 5)) + 1).astype(np.float32)
    compare_layer(layer, module, x, False, rng)


def test_batchnorm2d_running_stats_track_torch_over_steps(
    make_layer: Any, rng: np.random.Generator
) -> None:
    """Without any reloading, five training batches move both running statistics alike."""
    layer = make_layer({"type": "batchnorm2d"}, (4, 3, 3), np.float32)
    module = nn.BatchNorm2d(4).train()
    for _ in range(5):
        x = (3 * rng.standard_normal((5, 4, 3, 3)) - 2).astype(np.float32)
        layer.forward(x, True)
        module(t(x))
    for name, buf in module.named_buffers():
        close(np.asarray(layer.buffers[name]).astype(buf.numpy().dtype), buf)


def test_cross_entropy_matches_torch(rng: np.random.Generator) -> None:
    """softmax_cross_entropy's loss and dL/dlogits equal nn.CrossEntropyLoss (mean)."""
    logits = (4 * rng.standard_normal((9, 7))).astype(np.float32)
    labels = rng.integers(0, 7, 9)
    loss, d, correct = kernels.softmax_cross_entropy(logits, labels)
    tl = t(logits, grad=True)
    tloss = nn.CrossEntropyLoss()(tl, torch.from_numpy(labels))
    tloss.backward()
    np.testing.assert_allclose(loss, tloss.item(), **TOL)
    close(d, tl.grad)
    assert correct == int((tl.argmax(1).numpy() == labels).sum())


LENET = {
    "input_shape": [1, 16, 16],
    "layers": [
        {"type": "conv2d", "out_channels": 6, "kernel_size": 5, "padding": 2},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "conv2d", "out_channels": 16, "kernel_size": 5},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 32},
        {"type": "relu"},
        {"type": "linear", "out_features": 10},
    ],
}


def torch_lenet() -> Any:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def load_into_torch(model: Sequential, module: Any) -> None:
    """cnnd state_dict -> torch module, strictly: names and shapes must agree exactly."""
    state = model.state_dict()
    theirs = module.state_dict()
    assert list(state) == list(theirs), "names and order must equal torch.nn.Sequential's"
    assert {k: v.shape for k, v in state.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)


def test_lenet_sgd_step_matches_torch(rng: np.random.Generator) -> None:
    """A LeNet-style network loaded into torch from cnnd's state_dict gives the same logits,
    loss, gradients, and, after one SGD step (momentum 0.9, weight decay 1e-4), the same
    weights; a second step exercises the momentum buffer."""
    model = Sequential.from_spec(LENET, seed=42)
    module = torch_lenet()
    load_into_torch(model, module)
    opt = SGD(lr=0.05, momentum=0.9, weight_decay=1e-4)
    topt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):
        x = rng.standard_normal((16, 1, 16, 16)).astype(np.float32)
        y = rng.integers(0, 10, 16)
        logits = model.forward(x, train=True)
        loss, dlogits, _ = kernels.softmax_cross_entropy(logits, y)
        model.backward(dlogits, need_input_grad=False)
        opt.step(model.named_parameters(), model.grads())

        topt.zero_grad()
        tlogits = module(t(x))
        tloss = nn.functional.cross_entropy(tlogits, torch.from_numpy(y))
        tloss.backward()
        close(logits, tlogits)
        np.testing.assert_allclose(loss, tloss.item(), **TOL)
        for name, p in module.named_parameters():
            close(model.grads()[name], p.grad)
        topt.step()
        for name, p in module.named_parameters():
            close(model.named_parameters()[name], p)


def _random_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "0.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
        "0.bias": rng.standard_normal(4).astype(np.float32),
        "2.weight": rng.standard_normal((5, 6)).astype(np.float32),
    }


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            lambda: Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6),
            lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6),
        ),
        (
            lambda: Adam(lr=0.01, weight_decay=0.1),
            lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1),
        ),
        (
            lambda: AdamW(lr=0.01, weight_decay=0.2),
            lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.2),
        ),
        (
            lambda: SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        ),
        (
            lambda: SGD(lr=0.1, momentum=0.5, dampening=0.3),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5, dampening=0.3),
        ),
    ],
    ids=["adam", "adam-l2", "adamw", "sgd-nesterov", "sgd-dampening"],
)
def test_optimizer_steps_match_torch(ours: Any, theirs: Any, rng: np.random.Generator) -> None:
    """Four steps of Adam / AdamW / SGD variants on the same gradients give the same
    parameters and the same state (moments, momentum buffers) as torch.optim."""
    params = _random_params(rng)
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt, topt = ours(), theirs(list(tparams.values()))
    for _ in range(4):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        opt.step(params, grads)
        for k, p in tparams.items():
            p.grad = torch.from_numpy(grads[k].copy())
        topt.step()
        for k, p in tparams.items():
            close(params[k], p)
    state = opt.state_dict()
    assert int(state["steps"]) == 4
    for k, p in tparams.items():
        for buf, value in topt.state[p].items():
            if buf != "step":
                close(state[f"{k}/{buf}"], value)


@pytest.mark.parametrize(
    ("schedule", "scheduler", "epochs"),
    [
        (
            Schedule("step", step_size=3, gamma=0.5),
            lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
            12,
        ),
        (
            Schedule("cosine", eta_min=1e-3),
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=1e-3),
            10,
        ),
        (
            Schedule("cosine", t_max=7),
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7),
            8,  # lr at epoch t_max is eta_min in both
        ),
    ],
    ids=["step", "cosine-t_max=epochs", "cosine-t_max"],
)
def test_schedules_match_torch(schedule: Schedule, scheduler: Any, epochs: int) -> None:
    """Schedule.lr per epoch equals torch's StepLR / CosineAnnealingLR stepped once an epoch."""
    topt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = scheduler(topt)
    theirs = []
    for _ in range(epochs):
        theirs.append(topt.param_groups[0]["lr"])
        topt.step()
        sched.step()
    ours = [schedule.lr(0.2, e, epochs) for e in range(epochs)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_batchnorm_dropout_model_state_dict_round_trips_into_torch(
    rng: np.random.Generator,
) -> None:
    """A trained model with batchnorm2d and dropout(p=0) loads into torch.nn.Sequential with
    strict=True and gives the same evaluation outputs; the reverse load is exact."""
    spec = {
        "input_shape": [2, 8, 8],
        "layers": [
            {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
            {"type": "batchnorm2d"},
            {"type": "relu"},
            {"type": "dropout", "p": 0.0},
            {"type": "maxpool2d", "kernel_size": 2},
            {"type": "flatten"},
            {"type": "linear", "out_features": 5},
        ],
    }
    model = Sequential.from_spec(spec, seed=9)
    opt = SGD(lr=0.1, momentum=0.9)
    for _ in range(3):  # move weights and running statistics away from their initial values
        x = (rng.standard_normal((8, 2, 8, 8)) + 0.5).astype(np.float32)
        _, d, _ = kernels.softmax_cross_entropy(model.forward(x, True), rng.integers(0, 5, 8))
        model.backward(d, need_input_grad=False)
        opt.step(model.named_parameters(), model.grads())
    assert not np.allclose(model.state_dict()["1.running_var"], 1)
    module = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.0),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 5),
    )
    load_into_torch(model, module)
    module.eval()
    x = rng.standard_normal((6, 2, 8, 8)).astype(np.float32)
    with torch.no_grad():
        close(model.forward(x), module(t(x)))
    back = Sequential.from_spec(spec, seed=0)
    back.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v)
