"""Training loop: fit with validation, exact interrupt/resume, non-finite losses, early
stopping, callbacks, evaluate and predict."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cnnd.core import (
    SGD,
    Adam,
    AdamW,
    NonFiniteLossError,
    Optimizer,
    Schedule,
    Sequential,
    StepEvent,
    TrainState,
    evaluate,
    fit,
    kernels,
    predict,
    stratified_split,
)

SPEC: dict[str, Any] = {
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm2d"},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.3},
        {"type": "linear", "out_features": 16},
        {"type": "relu"},
        {"type": "linear", "out_features": 3},
    ],
}


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 3-class images: class c brightens column band c, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    rng.shuffle(y)
    x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32) * 0.5
    for c in range(3):
        x[y == c, :, :, 1 + 2 * c : 3 + 2 * c] += 1.5
    return x, y


def counter(limit: int) -> Callable[[], bool]:
    """should_stop that turns true once ``limit`` steps have been allowed."""
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        return calls[0] > limit

    return should_stop


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k, v in a.items():
        assert np.array_equal(v, b[k]), k


def history_rows(state: TrainState) -> list[tuple[Any, ...]]:
    """The history without wall-clock times."""
    return [(h.epoch, h.loss, h.accuracy, h.val_loss, h.val_accuracy, h.lr) for h in state.history]


def test_stratified_split() -> None:
    """stratified_split holds out round(fraction * n_c) of each class, disjoint from the rest,
    reproducibly for a seed."""
    y = np.array([0] * 20 + [1] * 10 + [2] * 7)
    train, val = stratified_split(y, 0.3, seed=4)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(y)))
    assert [int((y[val] == c).sum()) for c in range(3)] == [6, 3, 2]
    again = stratified_split(y, 0.3, seed=4)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(stratified_split(y, 0.3, seed=5)[1], val)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="validation fraction"):
            stratified_split(y, bad, seed=0)


def test_fit_with_validation_fraction_learns() -> None:
    """fit(validation=0.25) trains on the rest only, reports validation metrics each epoch
    (equal to evaluate on the held-out split), and learns a separable problem."""
    x, y = make_data(60)
    model = Sequential.from_spec(SPEC, seed=0)
    events: list[StepEvent] = []
    epochs_seen: list[int] = []
    result = fit(
        model, x, y, epochs=8, batch_size=10, optimizer=Adam(lr=0.01), validation=0.25,
        seed=3, on_step=events.append, on_epoch=lambda r, st: epochs_seen.append(st.epoch),
    )  # fmt: skip
    assert result.completed and result.state.epoch == 8
    assert epochs_seen == list(range(1, 9))
    # 45 training samples (15 held out) -> 5 steps per epoch, 40 in all.
    assert len(events) == 40 and {e.steps for e in events} == {5}
    assert [(e.epoch, e.step) for e in events[:6]] == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5),
                                                      (2, 1)]  # fmt: skip
    assert all(e.samples_per_second > 0 and e.lr == 0.01 for e in events)
    history = result.history
    assert len(history) == 8
    assert all(h.val_loss is not None and h.val_accuracy is not None for h in history)
    _, val = stratified_split(y, 0.25, seed=3)
    val_loss, val_acc = evaluate(model, x[val], y[val])
    assert history[-1].val_loss == pytest.approx(val_loss, rel=1e-6)
    assert history[-1].val_accuracy == val_acc
    assert history[-1].loss < 0.5 * history[0].loss
    assert history[-1].val_accuracy >= 0.9


def test_fit_with_explicit_validation_set() -> None:
    """A held-out (x, y) pair is evaluated as given; training uses every sample."""
    x, y = make_data(30)
    xv, yv = make_data(12, seed=1)
    model = Sequential.from_spec(SPEC, seed=0)
    steps: list[int] = []
    result = fit(model, x, y, epochs=2, batch_size=8, validation=(xv, yv),
                 on_step=lambda e: steps.append(e.steps))  # fmt: skip
    assert set(steps) == {4}  # ceil(30 / 8)
    assert result.history[-1].val_loss == pytest.approx(evaluate(model, xv, yv)[0], rel=1e-6)


OPTIMIZERS: dict[str, tuple[Callable[[], Optimizer], Schedule]] = {
    "sgd-momentum-step": (
        lambda: SGD(lr=0.05, momentum=0.9, weight_decay=1e-4),
        Schedule("step", step_size=1, gamma=0.5),
    ),
    "adam-cosine": (lambda: Adam(lr=0.01), Schedule("cosine")),
    "adamw-constant": (lambda: AdamW(lr=0.01, weight_decay=0.05), Schedule()),
}
FIT_ARGS: dict[str, Any] = {"epochs": 3, "batch_size": 8, "validation": 0.2, "seed": 11}


def uninterrupted(kind: str, x: np.ndarray, y: np.ndarray) -> tuple[Sequential, TrainState]:
    make_opt, schedule = OPTIMIZERS[kind]
    model = Sequential.from_spec(SPEC, seed=2)
    result = fit(model, x, y, optimizer=make_opt(), schedule=schedule, **FIT_ARGS)
    assert result.completed
    return model, result.state


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("stops", [(3,), (6,), (2, 7), (15,)], ids=str)
def test_interrupt_and_resume_from_checkpoint_is_exact(kind: str, stops: tuple[int, ...]) -> None:
    """A run interrupted by should_stop (mid-epoch, at an epoch boundary, or twice), then
    restored into a *new* model and optimizer from state_dicts and a JSON TrainState, ends
    with weights, buffers, optimizer state and history identical to an uninterrupted run
    with the same seed, dropout and batchnorm included."""
    x, y = make_data(50)
    train, _ = stratified_split(y, FIT_ARGS["validation"], FIT_ARGS["seed"])
    steps = math.ceil(len(train) / FIT_ARGS["batch_size"])
    assert steps == 6  # so (6,) stops at an epoch boundary and the others mid-epoch
    reference, ref_state = uninterrupted(kind, x, y)
    make_opt, schedule = OPTIMIZERS[kind]
    model, opt = Sequential.from_spec(SPEC, seed=2), make_opt()
    state: TrainState | None = None
    for limit in stops:
        result = fit(model, x, y, optimizer=opt, schedule=schedule, state=state,
                     should_stop=counter(limit), **FIT_ARGS)  # fmt: skip
        assert not result.completed
        done = result.state.epoch * steps + result.state.step
        assert done == sum(stops[: stops.index(limit) + 1])
        # Checkpoint, then restore into fresh objects (another seed: loading must overwrite).
        model_state, opt_state = model.state_dict(), opt.state_dict()
        saved = json.dumps(result.state.to_dict())
        model, opt = Sequential.from_spec(SPEC, seed=99), make_opt()
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        state = TrainState.from_dict(json.loads(saved))
    result = fit(model, x, y, optimizer=opt, schedule=schedule, state=state, **FIT_ARGS)
    assert result.completed
    assert_same_state(model.state_dict(), reference.state_dict())
    assert history_rows(result.state) == history_rows(ref_state)
    ref_opt = make_opt()
    fit(Sequential.from_spec(SPEC, seed=2), x, y, optimizer=ref_opt, schedule=schedule,
        **FIT_ARGS)  # fmt: skip
    assert_same_state(opt.state_dict(), ref_opt.state_dict())


@pytest.mark.parametrize("kind", ["sgd-momentum-step", "adam-cosine"])
def test_interrupt_and_resume_in_process_is_exact(kind: str) -> None:
    """Passing the same model, optimizer and returned state back to fit resumes exactly,
    also with a learning-rate schedule (the optimizer's lr is the base lr again)."""
    x, y = make_data(50)
    reference, ref_state = uninterrupted(kind, x, y)
    make_opt, schedule = OPTIMIZERS[kind]
    model, opt = Sequential.from_spec(SPEC, seed=2), make_opt()
    result = fit(model, x, y, optimizer=opt, schedule=schedule, should_stop=counter(7),
                 **FIT_ARGS)  # fmt: skip
    assert not result.completed and (result.state.epoch, result.state.step) == (1, 1)
    result = fit(model, x, y, optimizer=opt, schedule=schedule, state=result.state, **FIT_ARGS)
    assert history_rows(result.state) == history_rows(ref_state)
    assert_same_state(model.state_dict(), reference.state_dict())


def test_runs_are_reproducible_and_seed_matters() -> None:
    """Two runs with the same seed are bitwise identical; another seed (other shuffles and
    dropout masks) is not, so the resume comparisons above are not vacuous."""
    x, y = make_data(50)
    a, _ = uninterrupted("adam-cosine", x, y)
    b, _ = uninterrupted("adam-cosine", x, y)
    assert_same_state(a.state_dict(), b.state_dict())
    c = Sequential.from_spec(SPEC, seed=2)
    fit(c, x, y, optimizer=Adam(lr=0.01), schedule=Schedule("cosine"), **(FIT_ARGS | {"seed": 12}))
    assert not np.array_equal(a.state_dict()["6.weight"], c.state_dict()["6.weight"])


def test_dropout_masks_depend_on_step_and_layer() -> None:
    """During fit each step draws a fresh dropout mask (from seed, epoch, step, layer)."""
    x, y = make_data(24)
    model = Sequential.from_spec(SPEC, seed=0)
    dropout = model.layers[5]
    masks: list[np.ndarray] = []
    fit(model, x, y, epochs=2, batch_size=8, on_step=lambda e: masks.append(dropout._mask.copy()))
    assert len(masks) == 6
    assert all((m == 0).any() and (m > 0).any() for m in masks)
    assert all(not np.array_equal(masks[i], masks[j]) for i in range(6) for j in range(i))


def finite(model: Sequential) -> bool:
    return all(np.isfinite(v).all() for v in model.state_dict().values())


def test_huge_learning_rate_raises_non_finite_loss() -> None:
    """lr=1e6 diverges: fit raises NonFiniteLossError("non-finite loss at epoch E step S")
    before applying that step, so the weights are those after step S - 1 and still finite."""
    x, y = make_data(60)
    model = Sequential.from_spec(SPEC, seed=0)
    snapshots: list[tuple[int, int, dict[str, np.ndarray]]] = []

    def snapshot(ev: StepEvent) -> None:
        snapshots.append((ev.epoch, ev.step, model.state_dict()))

    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss at epoch \d+ step \d+$") as e:
        fit(model, x, y, epochs=50, batch_size=10, optimizer=SGD(lr=1e6), on_step=snapshot)
    err = e.value
    assert str(err) == f"non-finite loss at epoch {err.epoch} step {err.step}"
    epoch, step, last = snapshots[-1]
    assert (err.epoch, err.step) == ((epoch, step + 1) if step < 6 else (epoch + 1, 1))
    assert finite(model)
    assert_same_state(model.state_dict(), last)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan, 3e38], ids=str)
def test_non_finite_inputs_raise_before_any_update(value: float) -> None:
    """Inputs that make the loss, a gradient or a running statistic inf/NaN (finite 3e38
    overflows batchnorm's float32 running variance) stop the run at epoch 1 step 1 with
    weights and buffers untouched."""
    x, y = make_data(20)
    x[:] = value
    model = Sequential.from_spec(SPEC, seed=0)
    before = model.state_dict()
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss at epoch 1 step 1$"):
        fit(model, x, y, epochs=2, batch_size=5)
    assert_same_state(model.state_dict(), before)


def test_finite_loss_with_non_finite_gradient_is_refused() -> None:
    """A sigmoid saturated by infinite inputs gives a finite loss but a 0 * inf = NaN weight
    gradient: the step is refused like a non-finite loss, and the weights stay as they were."""
    spec = {
        "input_shape": [1, 4, 4],
        "layers": [
            {"type": "conv2d", "out_channels": 2, "kernel_size": 3},
            {"type": "sigmoid"},
            {"type": "flatten"},
            {"type": "linear", "out_features": 3},
        ],
    }
    model = Sequential.from_spec(spec, seed=0)
    conv = model.layers[0].params
    conv["weight"][:] = np.abs(conv["weight"])  # inf inputs -> +inf, never inf - inf
    x = np.full((6, 1, 4, 4), np.inf, np.float32)
    y = np.arange(6) % 3
    logits = model.forward(x, train=True)
    assert np.isfinite(kernels.softmax_cross_entropy(logits, y)[0]), "the loss is finite"
    before = model.state_dict()
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss at epoch 1 step 1$"):
        fit(model, x, y, epochs=1, batch_size=6)
    assert_same_state(model.state_dict(), before)


def test_one_bad_sample_stops_at_its_step() -> None:
    """With one corrupted sample, the error names the step whose batch holds it; every
    earlier step was applied and the weights stay finite."""
    x, y = make_data(40)
    x[17, 0, 3, 3] = np.inf
    model = Sequential.from_spec(SPEC, seed=0)
    steps: list[StepEvent] = []
    with pytest.raises(NonFiniteLossError) as e:
        fit(model, x, y, epochs=1, batch_size=8, seed=5, on_step=steps.append)
    assert e.value.epoch == 1 and e.value.step == len(steps) + 1
    assert finite(model)
    order = np.random.default_rng([5, 0]).permutation(40)
    assert 17 in order[8 * len(steps) : 8 * (len(steps) + 1)]


def test_patience_stops_early_on_validation_loss() -> None:
    """With patience p, fit stops once p epochs in a row fail to lower the best validation
    loss; the state says so, and the stopping rule holds on the recorded history."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 48)  # random labels: validation loss soon rises while training fits
    model = Sequential.from_spec(SPEC, seed=0)
    result = fit(model, x, y, epochs=40, batch_size=8, optimizer=Adam(lr=0.01),
                 validation=0.25, patience=3)  # fmt: skip
    history = result.history
    assert result.completed and result.state.stopped_early
    assert 3 < len(history) < 40
    losses = [h.val_loss for h in history]
    best = min(losses[:-3])
    assert all(v >= best for v in losses[-3:]), "the last 3 epochs did not improve"
    assert losses.index(min(losses)) == len(losses) - 4
    assert result.state.bad_epochs == 3 and result.state.best_val_loss == best
    # A finished early-stopped state does not train further when passed back.
    again = fit(model, x, y, epochs=40, batch_size=8, state=result.state, patience=3)
    assert len(again.history) == len(history)


def test_patience_without_validation_watches_training_loss() -> None:
    """Without validation, patience watches the training loss: a learning run whose loss
    keeps falling is not stopped."""
    x, y = make_data(30)
    result = fit(Sequential.from_spec(SPEC, seed=0), x, y, epochs=5, batch_size=10,
                 optimizer=Adam(lr=0.01), patience=1)  # fmt: skip
    losses = [h.loss for h in result.history]
    assert all(b < a for a, b in itertools.pairwise(losses))
    assert len(result.history) == 5 and not result.state.stopped_early


def test_schedule_lr_is_applied_per_epoch() -> None:
    """History records the scheduled learning rate of each epoch."""
    x, y = make_data(20)
    schedule = Schedule("step", step_size=2, gamma=0.1)
    result = fit(Sequential.from_spec(SPEC), x, y, epochs=5, batch_size=10,
                 optimizer=SGD(lr=0.5), schedule=schedule)  # fmt: skip
    assert [h.lr for h in result.history] == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005])


def test_evaluate_and_predict(rng: np.random.Generator) -> None:
    """predict returns (N, classes) float32 logits independent of the batch size; evaluate's
    loss and accuracy are those of the logits; uint8 images are scaled to [0, 1]."""
    x, y = make_data(37)
    model = Sequential.from_spec(SPEC, seed=1)
    fit(model, x, y, epochs=2, batch_size=8, optimizer=Adam(lr=0.01))
    logits = predict(model, x)
    assert logits.shape == (37, 3) and logits.dtype == np.float32
    np.testing.assert_allclose(predict(model, x, batch_size=5), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(predict(model, x[:0]), np.empty((0, 3), np.float32))
    loss, acc = evaluate(model, x, y, batch_size=10)
    assert acc == np.mean(logits.argmax(axis=1) == y)
    assert loss == pytest.approx(kernels.softmax_cross_entropy(logits, y)[0], rel=1e-5)
    assert evaluate(model, x[:0], y[:0]) == (0.0, 0.0)
    images = rng.integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    np.testing.assert_allclose(
        predict(model, images),
        predict(model, images.astype(np.float32) / 255),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"epochs": 0}, "epochs and batch_size must be >= 1"),
        ({"epochs": 1, "batch_size": 0}, "epochs and batch_size must be >= 1"),
        ({"epochs": 1, "validation": 1.0}, "validation fraction"),
    ],
)
def test_fit_argument_errors(kwargs: dict[str, Any], pattern: str) -> None:
    """Nonsense arguments raise ValueError before training."""
    x, y = make_data(12)
    with pytest.raises(ValueError, match=pattern):
        fit(Sequential.from_spec(SPEC), x, y, **kwargs)


def test_data_errors() -> None:
    """Wrong image shapes, label shapes or out-of-range labels raise ValueError."""
    x, y = make_data(12)
    model = Sequential.from_spec(SPEC)
    with pytest.raises(ValueError, match=r"training images have shape \(12, 1, 8, 7\)"):
        fit(model, x[..., :7], y, epochs=1)
    with pytest.raises(ValueError, match="training labels have shape"):
        fit(model, x, y[:5], epochs=1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got 0..3"):
        fit(model, x, np.where(y == 2, 3, y), epochs=1)
    with pytest.raises(ValueError, match="labels must be in"):
        evaluate(model, x, y - 1)
    with pytest.raises(ValueError, match="validation images"):
        fit(model, x, y, epochs=1, validation=(x[:, :, :4], y))
    assert math.isfinite(evaluate(model, x, y)[0])
