"""Optimizers with PyTorch's update rules, and learning-rate schedules.

Updates run in place on the model's parameter arrays, in float32 as PyTorch does, in one fused
pass per parameter (``cnnd.core.kernels.optim``; ``cnnd.core.reference`` has the same rules in
NumPy). Optimizer state (momentum buffers, Adam moments, step counts) round-trips through
``state_dict`` as plain arrays, so a checkpoint restores it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnnd.core.kernels.optim import adam_step, sgd_step

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")


class Optimizer:
    """Base class: ``step(params, grads)`` updates ``params`` in place."""

    def __init__(self, lr: float, weight_decay: float = 0.0) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.state: dict[str, dict[str, np.ndarray]] = {}
        self.steps = 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.steps += 1
        for name, p in params.items():
            self._update(name, p, grads[name], self.state.setdefault(name, {}))

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, s: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat arrays: ``steps`` and ``<param>/<buffer>`` for every state buffer."""
        out = {"steps": np.array(self.steps, dtype=np.int64)}
        for name, buffers in self.state.items():
            for key, value in buffers.items():
                out[f"{name}/{key}"] = value.copy()
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.steps = int(state["steps"])
        self.state = {}
        for key, value in state.items():
            if key == "steps":
                continue
            name, _, buf = key.rpartition("/")
            self.state.setdefault(name, {})[buf] = np.array(value)


class SGD(Optimizer):
    """torch.optim.SGD: g += wd*p; buf = momentum*buf + (1 - dampening)*g (buf = g at first);
    g = g + momentum*buf if nesterov else buf; p -= lr*g."""

    def __init__(
        self,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        dampening: float = 0.0,
    ) -> None:
        super().__init__(lr, weight_decay)
        if not (0 <= momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0")
        self.momentum = float(momentum)
        self.nesterov = nesterov
        self.dampening = float(dampening)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, s: dict[str, np.ndarray]) -> None:
        buf, first = p, False  # no momentum: no buffer (the kernel does not touch it)
        if self.momentum:
            buf = s.get("momentum_buffer")
            first = buf is None
            if first:  # PyTorch starts the buffer at the first gradient
                buf = np.empty_like(p)
        sgd_step(p, g, buf, first, self.lr, self.momentum, self.dampening, self.weight_decay,
                 self.nesterov)  # fmt: skip
        if first:  # kept only once filled: a step refused (bad gradient) leaves no state
            s["momentum_buffer"] = buf


class Adam(Optimizer):
    """torch.optim.Adam (and AdamW with ``decoupled=True``, which decays p by lr*wd first)."""

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        super().__init__(lr, weight_decay)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.betas = (float(b1), float(b2))
        self.eps = float(eps)
        self.decoupled = decoupled

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, s: dict[str, np.ndarray]) -> None:
        if "exp_avg" not in s:
            s["exp_avg"] = np.zeros_like(p)
            s["exp_avg_sq"] = np.zeros_like(p)
        adam_step(p, g, s["exp_avg"], s["exp_avg_sq"], self.steps, self.lr, self.betas,
                  self.eps, self.weight_decay, self.decoupled)  # fmt: skip


def AdamW(  # noqa: N802  (a constructor, named like PyTorch's class)
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> Adam:
    """torch.optim.AdamW: Adam with decoupled weight decay (default 0.01)."""
    return Adam(lr, betas, eps, weight_decay, decoupled=True)


def make_optimizer(
    name: str,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Optimizer:
    """Build an optimizer by name: "sgd", "adam" or "adamw"."""
    if name == "sgd":
        return SGD(lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return Adam(lr, betas, eps, weight_decay)
    if name == "adamw":
        return AdamW(lr, betas, eps, weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


@dataclass(frozen=True)
class Schedule:
    """Learning rate per epoch, as PyTorch's StepLR / CosineAnnealingLR stepped once an epoch.

    kind "constant": base lr. "step": lr * gamma ** (epoch // step_size).
    "cosine": eta_min + (lr - eta_min) * (1 + cos(pi * epoch / t_max)) / 2.
    """

    kind: str = "constant"
    step_size: int = 1
    gamma: float = 0.1
    t_max: int = 0  # 0: the number of epochs
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; expected one of {SCHEDULES}")
        if self.step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {self.step_size}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.t_max < 0:
            raise ValueError(f"t_max must be >= 0, got {self.t_max}")
        if not (math.isfinite(self.eta_min) and self.eta_min >= 0):
            raise ValueError(f"eta_min must be >= 0, got {self.eta_min}")

    def lr(self, base_lr: float, epoch: int, epochs: int) -> float:
        if self.kind == "step":
            try:
                return base_lr * self.gamma ** (epoch // self.step_size)
            except OverflowError:  # gamma > 1 over many epochs: training will diverge
                return math.inf
        if self.kind == "cosine":
            t_max = self.t_max or epochs
            return (
                self.eta_min
                + (base_lr - self.eta_min) * (1 + math.cos(math.pi * min(epoch, t_max) / t_max)) / 2
            )
        return base_lr
