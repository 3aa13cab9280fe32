"""Training and evaluation loops: fit, evaluate, predict.

Every random choice is a pure function of (seed, epoch, step): the shuffle of epoch e comes from
a generator seeded with (seed, e), the dropout masks of a step from (seed, e, step, layer). So a
run resumed from a ``TrainState`` saved at any step boundary, with the same weights and optimizer
state, continues exactly as the uninterrupted run would have, without saving any RNG state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnd.core.kernels import softmax_cross_entropy
from cnnd.core.layers import Dropout
from cnnd.core.model import Sequential
from cnnd.core.optim import SGD, Optimizer, Schedule


class NonFiniteLossError(RuntimeError):
    """The loss or its gradient became NaN or infinite; the step's update (weights and
    batchnorm running statistics) was not applied."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"non-finite loss at epoch {epoch} step {step}")
        self.epoch = epoch
        self.step = step


@dataclass
class StepEvent:
    """Progress after one optimisation step (epochs and steps counted from 1)."""

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float  # running mean over the epoch so far
    accuracy: float  # running accuracy over the epoch so far
    samples_per_second: float
    lr: float
    samples: int  # in this step's batch
    seconds: float  # this step's wall time


@dataclass
class EpochResult:
    """One row of a training history."""

    epoch: int
    loss: float
    accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float
    seconds: float


@dataclass
class TrainState:
    """Where a run stands, at a step boundary: enough to resume it exactly."""

    epoch: int = 0  # current epoch, from 0
    step: int = 0  # next step within it, from 0
    loss_sum: float = 0.0  # sums over the current epoch's finished steps
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    history: list[EpochResult] = field(default_factory=list)
    best_val_loss: float | None = None
    bad_epochs: int = 0
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        d = dict(d)
        d["history"] = [EpochResult(**row) for row in d.get("history", [])]
        return cls(**d)


@dataclass
class FitResult:
    state: TrainState
    completed: bool  # False when should_stop() interrupted the run

    @property
    def history(self) -> list[EpochResult]:
        return self.state.history


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation): ``fraction`` of each class, chosen with ``seed``."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 0x5EED])
    val = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val.append(idx[: round(fraction * len(idx))])
    v = np.sort(np.concatenate(val)) if val else np.empty(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[v] = False
    return np.flatnonzero(mask), v


def as_float(x: np.ndarray) -> np.ndarray:
    """A batch as float32: uint8 images are scaled to [0, 1], float32 passes through."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) * np.float32(1 / 255)
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_data(model: Sequential, x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != model.input_shape:
        raise ValueError(
            f"{what} images have shape {tuple(x.shape)}; the model expects (N, "
            f"{', '.join(map(str, model.input_shape))})"
        )
    if y.shape != (x.shape[0],):
        raise ValueError(f"{what} labels have shape {y.shape}; expected ({x.shape[0]},)")
    classes = model.output_shape
    if len(classes) != 1:
        raise ValueError(f"the model's output {classes} is not a vector of class scores")
    if len(y) and (y.min() < 0 or y.max() >= classes[0]):
        raise ValueError(f"{what} labels must be in [0, {classes[0]}), got {y.min()}..{y.max()}")


def evaluate(
    model: Sequential, x: np.ndarray, y: np.ndarray, batch_size: int = 256
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the model on (x, y), in evaluation mode."""
    _check_data(model, x, y, "evaluation")
    total, correct = 0.0, 0
    for lo in range(0, len(x), batch_size):
        logits = model.forward(as_float(x[lo : lo + batch_size]), train=False)
        loss, _, c = softmax_cross_entropy(logits, y[lo : lo + batch_size])
        total += loss * len(logits)
        correct += c
    n = max(len(x), 1)
    return total / n, correct / n


def predict(model: Sequential, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits (N, classes) for images x (N, C, H, W), in evaluation mode."""
    outs = [
        model.forward(as_float(x[lo : lo + batch_size]), train=False)
        for lo in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs) if outs else np.empty((0, *model.output_shape), np.float32)


def fit(
    model: Sequential,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 32,
    optimizer: Optimizer | None = None,
    schedule: Schedule | None = None,
    validation: tuple[np.ndarray, np.ndarray] | float | None = None,
    seed: int = 0,
    patience: int | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    on_epoch: Callable[[EpochResult, TrainState], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    state: TrainState | None = None,
) -> FitResult:
    """Train ``model`` on images x (N, C, H, W) (float32, or uint8 scaled to [0, 1]) and
    integer labels y (N,) with softmax cross-entropy and mini-batches.

    ``validation`` is a held-out (x, y) or a fraction split off x per class. ``patience`` stops
    after that many epochs without a lower validation loss (training loss without validation).
    ``on_step`` runs after every step, ``on_epoch`` after every epoch (with the state to
    checkpoint). When ``should_stop()`` turns true the run returns at the next step boundary
    with ``completed=False``; passing the returned state back, with the same weights and
    optimizer state, resumes it.
    Raises NonFiniteLossError, before updating, when the loss or a gradient is NaN or infinite.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    y = np.asarray(y).astype(np.int64, copy=False)
    _check_data(model, x, y, "training")
    optimizer = optimizer or SGD(lr=0.01)
    schedule = schedule or Schedule()
    base_lr = optimizer.lr
    train_idx = np.arange(len(x))
    val: tuple[np.ndarray, np.ndarray] | None = None
    if isinstance(validation, float):
        train_idx, val_idx = stratified_split(y, validation, seed)
        val = (x[val_idx], y[val_idx])
    elif validation is not None:
        xv, yv = validation
        yv = np.asarray(yv).astype(np.int64, copy=False)
        _check_data(model, xv, yv, "validation")
        val = (xv, yv)
    if len(train_idx) == 0:
        raise ValueError("no training samples left after the validation split")
    steps = math.ceil(len(train_idx) / batch_size)
    dropouts = [(i, layer) for i, layer in enumerate(model.layers) if isinstance(layer, Dropout)]
    params = model.named_parameters()
    st = state or TrainState()

    while st.epoch < epochs and not st.stopped_early:
        e = st.epoch
        optimizer.lr = schedule.lr(base_lr, e, epochs)
        order = train_idx[np.random.default_rng([seed, e]).permutation(len(train_idx))]
        t_epoch = time.perf_counter()
        while st.step < steps:
            if should_stop is not None and should_stop():
                st.seconds += time.perf_counter() - t_epoch
                # Hand the optimizer back with its base lr, not this epoch's scheduled one, so
                # that passing it to fit() again resumes with the same schedule.
                optimizer.lr = base_lr
                return FitResult(st, completed=False)
            t0 = time.perf_counter()
            idx = order[st.step * batch_size : (st.step + 1) * batch_size]
            for i, layer in dropouts:
                layer.rng = np.random.default_rng([seed, e, st.step, i])
            buffers = [(b, b.copy()) for layer in model.layers for b in layer.buffers.values()]
            logits = model.forward(as_float(x[idx]), train=True)
            loss, dlogits, correct = softmax_cross_entropy(logits, y[idx])
            grads = None
            if math.isfinite(loss):
                model.backward(dlogits, need_input_grad=False)
                grads = model.grads()
            # A finite loss can still come with non-finite gradients (a saturated sigmoid on an
            # infinite input gives 0 * inf) or running statistics (float32 overflow of the
            # variance of huge inputs); none of them may reach the model.
            checked = [] if grads is None else [*grads.values(), *(b for b, _ in buffers)]
            if grads is None or not all(np.isfinite(a).all() for a in checked):
                for buf, saved in buffers:  # undo this forward's running-statistics update
                    buf[...] = saved
                raise NonFiniteLossError(e + 1, st.step + 1)
            optimizer.step(params, grads)
            st.loss_sum += loss * len(idx)
            st.correct += correct
            st.seen += len(idx)
            st.step += 1
            if on_step is not None:
                dt = time.perf_counter() - t0
                on_step(
                    StepEvent(
                        epoch=e + 1, epochs=epochs, step=st.step, steps=steps,
                        loss=st.loss_sum / st.seen, accuracy=st.correct / st.seen,
                        samples_per_second=len(idx) / dt if dt > 0 else 0.0, lr=optimizer.lr,
                        samples=len(idx), seconds=dt,
                    )
                )  # fmt: skip
        val_loss = val_acc = None
        if val is not None:
            val_loss, val_acc = evaluate(model, *val)
        result = EpochResult(
            epoch=e + 1, loss=st.loss_sum / st.seen, accuracy=st.correct / st.seen,
            val_loss=val_loss, val_accuracy=val_acc, lr=optimizer.lr,
            seconds=st.seconds + time.perf_counter() - t_epoch,
        )  # fmt: skip
        st.history.append(result)
        st.epoch, st.step, st.loss_sum, st.correct, st.seen, st.seconds = e + 1, 0, 0.0, 0, 0, 0.0
        if patience is not None:
            watched = val_loss if val_loss is not None else result.loss
            if st.best_val_loss is None or watched < st.best_val_loss:
                st.best_val_loss, st.bad_epochs = watched, 0
            else:
                st.bad_epochs += 1
                st.stopped_early = st.bad_epochs >= patience
        if on_epoch is not None:
            on_epoch(result, st)
    return FitResult(st, completed=True)
