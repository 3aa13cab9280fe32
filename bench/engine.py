"""Engine benchmark: cnnd.core against PyTorch CPU on the same models, weights and threads.

    python bench/engine.py [--quick] [--repeats N] [--json out.json] [--threads T] [--no-torch]

Prints, from one run: machine info, Numba first-call (compile or cache-load) time, a
throughput table (training and inference samples/s for two models at batch 1, 32 and 128), the
machine's float32 GEMM rate with per-conv-layer GFLOP/s as a fraction of it, and the peak RSS
of LeNet-5 training in cnnd and in PyTorch, each measured in a subprocess of its own.

Module-level imports are stdlib and NumPy only: the memory probes run this file in a fresh
interpreter, and the PyTorch probe must not load Numba/LLVM (nor the cnnd probe torch), or each
peak would include the other framework's libraries.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from types import ModuleType

    from cnnd.core import Sequential

LENET5: dict[str, Any] = {
    "input_shape": [1, 28, 28],
    "layers": [
        {"type": "conv2d", "out_channels": 6, "kernel_size": 5, "padding": 2},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "conv2d", "out_channels": 16, "kernel_size": 5},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 120},
        {"type": "relu"},
        {"type": "linear", "out_features": 84},
        {"type": "relu"},
        {"type": "linear", "out_features": 10},
    ],
}

CIFAR: dict[str, Any] = {
    "input_shape": [3, 32, 32],
    "layers": [
        {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "conv2d", "out_channels": 64, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "conv2d", "out_channels": 64, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 256},
        {"type": "relu"},
        {"type": "linear", "out_features": 10},
    ],
}

MODELS: dict[str, dict[str, Any]] = {"LeNet-5": LENET5, "CIFAR": CIFAR}
BATCHES = (1, 32, 128)
MODES = ("train", "infer")
CLASSES = 10
# A small learning rate keeps the weights near their initial values over thousands of steps on
# one fixed batch (they are also reset before every window), so every window does the same work
# and no value drifts into the denormal range, which would slow down both engines for no reason.
LR, MOMENTUM = 1e-3, 0.9
SEED = 0
MEMORY_MODEL, MEMORY_BATCH = "LeNet-5", 128
GEMM_N = 1024
CONV_BATCH = 128


@dataclass(frozen=True)
class Settings:
    quick: bool
    repeats: int
    window_s: float  # target length of one timed window
    threads: int
    probe_steps: int  # training steps in each memory probe

    @property
    def label(self) -> str:
        kind = "quick" if self.quick else "full"
        return f"{kind}: median of {self.repeats} windows of ~{self.window_s:g} s"


@dataclass
class Timing:
    """One benchmarked operation: per-window rates and call counts, the first-call time."""

    rates: list[float] = field(default_factory=list)  # units (samples, FLOPs) per second
    steps: list[int] = field(default_factory=list)  # calls in each timed window
    first_call_s: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def spread(self) -> float:
        """Half the min-max range of the windows, as a fraction of the median."""
        return (max(self.rates) - min(self.rates)) / 2 / self.median


@dataclass
class Contender:
    """One side of an interleaved comparison: ``step`` runs once per call, ``reset`` restores
    state before each timed window (outside the timing)."""

    step: Callable[[], object]
    reset: Callable[[], object] = lambda: None
    units_per_step: float = 1.0
    timing: Timing = field(default_factory=Timing)


# ---------------------------------------------------------------------------------------------
# Timing


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    # A cyclic-GC pass (triggered by torch's autograd objects, say) would land in whichever
    # window happens to allocate past the threshold; collect before and hold it off during.
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _run_for(step: Callable[[], object], seconds: float) -> tuple[int, float]:
    """Call step until ``seconds`` have passed (at least once): (calls, elapsed). Windows bounded
    by time rather than by a call count calibrated up front keep their length when a neighbour
    starts loading the machine half-way through the run."""
    n = 0
    t0 = time.perf_counter()
    while True:
        step()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n, elapsed


def measure(contenders: dict[str, Contender], settings: Settings) -> None:
    """Warm up each contender, then time ``repeats`` windows of each, alternating which goes
    first, so that a noisy neighbour on the machine slows all of them alike."""
    with _no_gc():
        _measure(contenders, settings)


def _measure(contenders: dict[str, Contender], settings: Settings) -> None:
    for c in contenders.values():
        c.reset()
        t0 = time.perf_counter()
        c.step()
        c.timing.first_call_s = time.perf_counter() - t0
        _run_for(c.step, settings.window_s / 2)  # warm-up: caches, allocator, thread pools
    names = list(contenders)
    for r in range(settings.repeats):
        for name in names if r % 2 == 0 else reversed(names):
            c = contenders[name]
            c.reset()
            n, elapsed = _run_for(c.step, settings.window_s)
            c.timing.steps.append(n)
            c.timing.rates.append(c.units_per_step * n / elapsed)


# ---------------------------------------------------------------------------------------------
# Models and steps


def import_torch(enabled: bool = True) -> ModuleType | None:
    if not enabled:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_model(torch: ModuleType, spec: dict[str, Any]) -> Any:
    """The torch.nn.Sequential equivalent of a spec (conv2d, relu, maxpool2d, flatten, linear),
    with the same module indices, hence the same state_dict names, as cnnd's Sequential. Shapes
    are tracked here rather than taken from cnnd's validated spec, so that the PyTorch memory
    probe need not import cnnd (and Numba)."""
    nn = torch.nn
    c, h, w = spec["input_shape"]
    features = c * h * w
    layers = []
    for entry in spec["layers"]:
        kind = entry["type"]
        if kind == "conv2d":
            k, s, p = entry["kernel_size"], entry.get("stride", 1), entry.get("padding", 0)
            layers.append(nn.Conv2d(c, entry["out_channels"], k, stride=s, padding=p))
            c, h, w = entry["out_channels"], (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        elif kind == "maxpool2d":
            k = entry["kernel_size"]
            s = entry.get("stride") or k
            layers.append(nn.MaxPool2d(k, s))
            h, w = (h - k) // s + 1, (w - k) // s + 1
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "flatten":
            layers.append(nn.Flatten())
            features = c * h * w
        elif kind == "linear":
            layers.append(nn.Linear(features, entry["out_features"]))
            features = entry["out_features"]
        else:
            raise ValueError(f"bench/engine.py has no torch equivalent for layer type {kind!r}")
    return nn.Sequential(*layers)


def batch_data(spec: dict[str, Any], batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs uniform in [0, 1) like scaled images, and random labels."""
    rng = np.random.default_rng([seed, batch])
    x = rng.random((batch, *spec["input_shape"]), dtype=np.float32)
    return x, rng.integers(0, CLASSES, batch, dtype=np.int64)


class CnndSide:
    """A cnnd model with an SGD-momentum optimizer and its initial weights."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from cnnd.core import SGD, Sequential

        self.model: Sequential = Sequential.from_spec(spec, seed=SEED)
        self.initial = self.model.state_dict()
        self.params = self.model.named_parameters()
        self.optimizer = SGD(lr=LR, momentum=MOMENTUM)

    def reset(self) -> None:
        for name, p in self.params.items():
            p[...] = self.initial[name]

    def train_step(self, x: np.ndarray, y: np.ndarray) -> Callable[[], object]:
        from cnnd.core.kernels import softmax_cross_entropy

        model, params, optimizer = self.model, self.params, self.optimizer

        def step() -> None:
            # The inner loop of cnnd.core.fit, minus its bookkeeping.
            logits = model.forward(x, train=True)
            _, dlogits, _ = softmax_cross_entropy(logits, y)
            model.backward(dlogits, need_input_grad=False)
            optimizer.step(params, model.grads())

        return step

    def infer_step(self, x: np.ndarray) -> Callable[[], object]:
        model = self.model
        return lambda: model.forward(x, train=False)


class TorchSide:
    """The PyTorch twin of a CnndSide, starting from the same weights (or torch's own init)."""

    def __init__(
        self, torch: ModuleType, spec: dict[str, Any], state: dict[str, np.ndarray] | None
    ) -> None:
        self.torch = torch
        self.model = torch_model(torch, spec)
        if state is not None:
            self.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)

    def reset(self, train: bool) -> None:
        self.model.train(train)
        with self.torch.no_grad():
            for name, p in self.model.state_dict().items():
                p.copy_(self.initial[name])

    def train_step(self, x: np.ndarray, y: np.ndarray) -> Callable[[], object]:
        torch = self.torch
        model, optimizer = self.model, self.optimizer
        # from_numpy shares memory; the input does not require grad, so backward stops at the
        # first layer's weights, as cnnd's need_input_grad=False does.
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        cross_entropy = torch.nn.functional.cross_entropy

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            cross_entropy(model(tx), ty).backward()
            optimizer.step()

        return step

    def infer_step(self, x: np.ndarray) -> Callable[[], object]:
        torch, model = self.torch, self.model
        tx = torch.from_numpy(x)

        def step() -> object:
            # inference_mode per call, as a server would use it per request.
            with torch.inference_mode():
                return model(tx)

        return step


def check_equivalence(cn: CnndSide, th: TorchSide, spec: dict[str, Any]) -> dict[str, float]:
    """Relative max differences of logits and gradients for one batch: the comparison is only
    meaningful if both engines compute the same function from the same weights."""
    import copy

    from cnnd.core.kernels import softmax_cross_entropy

    torch = th.torch
    x, y = batch_data(spec, 8, SEED + 1)
    # In float64: in float32 the two engines round differently, and a near-tie in a max-pool
    # window can then route one gradient to another pixel (a 2% difference in a conv weight
    # gradient, seen here), which says nothing about whether they compute the same function.
    model = cn.model.astype(np.float64)
    x64 = x.astype(np.float64)
    logits = model.forward(x64, train=True)
    loss, dlogits, _ = softmax_cross_entropy(logits, y)
    model.backward(dlogits, need_input_grad=False)
    t_model = copy.deepcopy(th.model).double()
    t_model.train()
    t_logits = t_model(torch.from_numpy(x64))
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.from_numpy(y))
    t_loss.backward()
    t_grads = {k: p.grad.numpy() for k, p in t_model.named_parameters()}
    grad_err = max(
        float(np.abs(g - t_grads[k]).max() / (np.abs(t_grads[k]).max() + 1e-30))
        for k, g in model.grads().items()
    )
    t_np = t_logits.detach().numpy()
    return {
        "logits_rel": float(np.abs(logits - t_np).max() / np.abs(t_np).max()),
        "loss_abs": abs(loss - float(t_loss.detach())),
        "grads_rel": grad_err,
    }


# ---------------------------------------------------------------------------------------------
# Benchmarks


def jit_warmup(sides: dict[str, CnndSide]) -> dict[str, Any]:
    """Time each model's first cnnd train and infer step: Numba compiles every kernel on its
    first call, or loads it from the on-disk cache when an earlier run left it there."""
    import numba

    from cnnd.core import kernels

    out: dict[str, Any] = {}
    for name, side in sides.items():
        x, y = batch_data(MODELS[name], 2, SEED)
        for mode, step in (("train", side.train_step(x, y)), ("infer", side.infer_step(x))):
            t0 = time.perf_counter()
            step()
            out[f"{name} {mode}"] = time.perf_counter() - t0
        side.reset()
    dispatchers = {
        id(obj): obj
        for module_name, module in sys.modules.items()
        if module_name.startswith(kernels.__name__ + ".")
        for obj in vars(module).values()
        if isinstance(obj, numba.core.dispatcher.Dispatcher)
    }
    hits = sum(sum(d.stats.cache_hits.values()) for d in dispatchers.values())
    misses = sum(sum(d.stats.cache_misses.values()) for d in dispatchers.values())
    return {
        "first_call_s": out,
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_dir": numba.config.CACHE_DIR,
    }


def bench_throughput(
    cnnd_sides: dict[str, CnndSide], torch_sides: dict[str, TorchSide], settings: Settings
) -> list[dict[str, Any]]:
    rows = []
    for name, cn in cnnd_sides.items():
        th = torch_sides.get(name)
        for batch in BATCHES:
            x, y = batch_data(MODELS[name], batch, SEED)
            for mode in MODES:
                train = mode == "train"
                contenders = {
                    "cnnd": Contender(
                        cn.train_step(x, y) if train else cn.infer_step(x), cn.reset, batch
                    )
                }
                if th is not None:
                    step = th.train_step(x, y) if train else th.infer_step(x)
                    contenders["torch"] = Contender(
                        step, lambda th=th, train=train: th.reset(train), batch
                    )
                measure(contenders, settings)
                row: dict[str, Any] = {"model": name, "batch": batch, "mode": mode}
                row |= {k: asdict(c.timing) for k, c in contenders.items()}
                rows.append(row)
                _progress(f"{name} batch {batch} {mode}")
    return rows


def bench_gemm(settings: Settings) -> dict[str, Any]:
    """float32 n x n GEMM: numpy matmul with T BLAS threads (the reference rate) and with one,
    and np.dot inside an njit function with one (SciPy's OpenBLAS, the library and the thread
    count every cnnd kernel actually gets). cnnd holds every BLAS in the process to one thread,
    since its kernels call BLAS from T prange threads at once; the limit is lifted only while
    the numpy T-thread contender runs and restored after."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(SEED)
    a, b = (rng.random((GEMM_N, GEMM_N), dtype=np.float32) for _ in range(2))
    c = np.empty_like(a)
    flops = 2.0 * GEMM_N**3
    numba_dot = _numba_dot()
    variants = {
        f"numpy matmul, {t} thread{'s' if t > 1 else ''}": (lambda: np.matmul(a, b, out=c), t)
        for t in sorted({settings.threads, 1}, reverse=True)
    }
    variants["numba np.dot, 1 thread (cnnd's BLAS)"] = (lambda: numba_dot(a, b, c), 1)
    original = threadpool_limits(limits=1, user_api="blas")
    try:
        contenders = {
            name: Contender(step, lambda t=t: threadpool_limits(limits=t, user_api="blas"), flops)
            for name, (step, t) in variants.items()
        }
        measure(contenders, settings)
    finally:
        original.restore_original_limits()
    timings = {name: asdict(c.timing) for name, c in contenders.items()}
    return {"n": GEMM_N, "reference": next(iter(timings)), "timings": timings}


def _numba_dot() -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    from numba import njit

    @njit(nogil=True)
    def dot(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        np.dot(a, b, out)

    return dot


def conv_layers(side: CnndSide) -> Iterator[tuple[int, Any, tuple[int, ...], Any]]:
    """(index, Conv2d layer, input shape per sample, LayerInfo) for each conv layer."""
    info = side.model.summary_info
    shape = tuple(info.input_shape)
    for i, (layer, row) in enumerate(zip(side.model.layers, info.layers, strict=True)):
        if layer.type == "conv2d":
            yield i, layer, shape, row
        shape = tuple(row.output_shape)


def bench_conv(
    cnnd_sides: dict[str, CnndSide], torch: ModuleType | None, settings: Settings
) -> list[dict[str, Any]]:
    """GFLOP/s of each conv layer's forward kernel alone at batch CONV_BATCH (FLOPs = 2 * MACs),
    cnnd's conv2d_forward against torch's conv2d on the same arrays."""
    from cnnd.core.kernels import conv2d_forward

    rows = []
    rng = np.random.default_rng(SEED)
    for name, side in cnnd_sides.items():
        for i, layer, shape, info in conv_layers(side):
            x = rng.random((CONV_BATCH, *shape), dtype=np.float32)
            w, b = layer.params["weight"], layer.params["bias"]
            flops = 2.0 * info.macs * CONV_BATCH
            # The output buffer is preallocated so the timing is the kernel's (im2col + GEMM).
            out = np.empty((CONV_BATCH, *info.output_shape), dtype=np.float32)
            stride, padding = layer.stride, layer.padding
            contenders = {
                "cnnd": Contender(
                    lambda x=x, w=w, b=b, s=stride, p=padding, o=out: conv2d_forward(
                        x, w, b, s, p, relu=False, out=o
                    ),
                    units_per_step=flops,
                )
            }
            if torch is not None:
                contenders["torch"] = Contender(
                    _torch_conv(torch, x, w, b, stride, padding), units_per_step=flops
                )
            measure(contenders, settings)
            k, c, kh, kw = w.shape
            row: dict[str, Any] = {
                "model": name,
                "layer": i,
                "conv": f"{c}->{k} {kh}x{kw} p{padding[0]}",
                "output": "x".join(map(str, info.output_shape)),
                "mflop_per_sample": 2.0 * info.macs / 1e6,
            }
            row |= {k: asdict(c.timing) for k, c in contenders.items()}
            rows.append(row)
            _progress(f"conv {name} layer {i}")
    return rows


def _torch_conv(
    torch: ModuleType,
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> Callable[[], object]:
    tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
    conv2d = torch.nn.functional.conv2d

    def step() -> object:
        with torch.inference_mode():
            return conv2d(tx, tw, tb, stride, padding)

    return step


# ---------------------------------------------------------------------------------------------
# Subprocess probes


def _vm_hwm_mib() -> float | None:
    """The process's peak RSS so far (Linux /proc), used as the after-import baseline."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_probe(framework: str, settings: Settings) -> None:
    """Child process: train MEMORY_MODEL at MEMORY_BATCH for probe_steps steps, print JSON with
    the peak RSS after imports and after training. Only one framework is imported."""
    spec = MODELS[MEMORY_MODEL]
    x, y = batch_data(spec, MEMORY_BATCH, SEED)
    if framework == "cnnd":
        import numba

        import cnnd.core  # noqa: F401  (loads Numba, LLVM and the BLAS setup)

        numba.set_num_threads(settings.threads)
        after_import = _vm_hwm_mib()
        cn = CnndSide(spec)
        step = cn.train_step(x, y)
    else:
        torch = import_torch()
        if torch is None:
            raise SystemExit("torch is not importable")
        torch.set_num_threads(settings.threads)
        after_import = _vm_hwm_mib()
        step = TorchSide(torch, spec, None).train_step(x, y)
    for _ in range(settings.probe_steps):
        step()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"after_import_mib": after_import, "peak_rss_mib": peak_kib / 1024}))


def run_memory_probes(frameworks: list[str], settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {"model": MEMORY_MODEL, "batch": MEMORY_BATCH}
    out["steps"] = settings.probe_steps
    for fw in frameworks:
        cmd = [sys.executable, __file__, "--memory-probe", fw, "--threads", str(settings.threads)]
        cmd += ["--probe-steps", str(settings.probe_steps)]
        # Linux carries ru_maxrss across execve: a child exec'd straight from this process
        # (hundreds of MiB by now) would report our peak, not its own. Going through a shell
        # that forks before exec gives the probe a fresh accounting that starts from the shell.
        out[fw] = _run_child(["/bin/sh", "-c", '"$@"; exit $?', "sh", *cmd], os.environ.copy())
        _progress(f"memory probe {fw}")
    return out


def compile_probe(settings: Settings) -> None:
    """Child process with an empty Numba cache: time the first cnnd steps (pure compilation)."""
    import numba

    numba.set_num_threads(settings.threads)
    sides = {name: CnndSide(spec) for name, spec in MODELS.items()}
    print(json.dumps(jit_warmup(sides)))


def run_compile_probe(settings: Settings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cnnd-bench-numba-") as cache:
        env = os.environ | {"NUMBA_CACHE_DIR": cache}
        cmd = [sys.executable, __file__, "--compile-probe", "--threads", str(settings.threads)]
        result = _run_child(cmd, env)
    _progress("cold compile probe")
    return result


def _run_child(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Machine info and report


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=False,
        )
    except OSError:
        return "unknown"
    return proc.stdout.strip() or "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(settings: Settings, torch: ModuleType | None) -> dict[str, Any]:
    import numba
    from threadpoolctl import threadpool_info

    from cnnd.core import threading_layer

    blas = [
        f"{d['internal_api']} {d.get('version')} {d.get('architecture', '')} "
        f"({Path(d['filepath']).name})".strip()
        for d in threadpool_info()
        if d["user_api"] == "blas"
    ]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "threads": settings.threads,
        "numba_threading_layer": threading_layer(),
        "numba_max_threads": numba.config.NUMBA_NUM_THREADS,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "blas": blas,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "scipy": _version("scipy"),
        "torch": torch.__version__ if torch is not None else "not used",
        "cnnd": f"{_version('cnnd')} (git {_git_commit()})",
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }


_T0 = time.perf_counter()


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its children).
    Their difference over the run says how much other work shared the machine with us."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    own = sum(
        r.ru_utime + r.ru_stime
        for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    return busy, own


def _others_cores(start: tuple[float, float] | None, wall_s: float) -> float | None:
    end = _cpu_seconds()
    if start is None or end is None or wall_s <= 0:
        return None
    return max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / wall_s


def _progress(msg: str) -> None:
    # Progress goes to stderr so stdout holds only the report; the clock shows where time goes.
    print(f"  [{time.perf_counter() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def _fmt_rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def _table(header: list[str], rows: list[list[str]], align: str) -> str:
    """Fixed-width columns; ``align`` holds "l" or "r" per column (text left, numbers right)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if align[i] == "l" else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def format_header(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    jit = results["jit"]
    first = ", ".join(f"{k} {v:.2f} s" for k, v in jit["first_call_s"].items())
    lines = [
        f"cnnd engine benchmark ({s['label']})",
        f"date       {m['date']}",
        f"cpu        {m['cpu']} ({m['logical_cores']} logical cores, {m['usable_cores']} usable)",
        f"threads    {m['threads']} (numba threading layer {m['numba_threading_layer']}"
        + (f"; torch.set_num_threads({m['torch_threads']}))" if m["torch_threads"] else ")"),
        f"versions   python {m['python']}, numpy {m['numpy']}, numba {m['numba']}, "
        f"scipy {m['scipy']}, torch {m['torch']}, cnnd {m['cnnd']}",
        f"blas       {'; '.join(m['blas'])}",
        f"load avg   {_loadavg(m['loadavg_start'])} at start, "
        f"{_loadavg(m['loadavg_end'])} at end (1/5/15 min)",
        f"other work {_others(m.get('others_cores_avg'))}",
        f"numba jit  first call: {first}",
        f"           kernels compiled {jit['cache_misses']}, loaded from cache "
        f"{jit['cache_hits']} (cache {jit['cache_dir']})",
    ]
    cold = results.get("cold_compile")
    if cold and "first_call_s" in cold:
        total = sum(cold["first_call_s"].values())
        lines.append(f"           empty-cache compile (subprocess): {total:.1f} s in total")
    for name, eq in results.get("equivalence", {}).items():
        lines.append(
            f"check      {name}: cnnd vs torch, same weights: logits rel {eq['logits_rel']:.1e}, "
            f"loss abs {eq['loss_abs']:.1e}, grads rel {eq['grads_rel']:.1e}"
        )
    return "\n".join(lines)


def _others(cores: float | None) -> str:
    if cores is None:
        return "unknown (no /proc/stat)"
    return f"{cores:.2f} cores busy on average with other processes during the run"


def _loadavg(v: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in v)


def format_throughput(rows: list[dict[str, Any]], with_torch: bool) -> str:
    header = ["model", "batch", "mode", "cnnd samples/s", "±%"]
    if with_torch:
        header += ["torch samples/s", "±%", "cnnd/torch"]
    body = []
    for r in rows:
        cn = Timing(**r["cnnd"])
        cells = [r["model"], str(r["batch"]), r["mode"], _fmt_rate(cn.median)]
        cells.append(f"{100 * cn.spread:.0f}")
        if with_torch:
            th = Timing(**r["torch"])
            cells += [_fmt_rate(th.median), f"{100 * th.spread:.0f}"]
            cells.append(f"{cn.median / th.median:.2f}")
        body.append(cells)
    return _table(header, body, "lll".ljust(len(header), "r"))


def format_gemm(gemm: dict[str, Any]) -> str:
    n = gemm["n"]
    rows = []
    for name, t in gemm["timings"].items():
        timing = Timing(**t)
        note = "reference for 'of GEMM'" if name == gemm["reference"] else ""
        rows.append([name, f"{timing.median / 1e9:.1f}", f"{100 * timing.spread:.0f}", note])
    return _table([f"float32 GEMM {n}x{n}", "GFLOP/s", "±%", ""], rows, "lrrl")


def format_conv(rows: list[dict[str, Any]], gemm_rate: float, with_torch: bool) -> str:
    header = ["model", "layer", "conv", "output", "MFLOP/sample", "cnnd GFLOP/s", "of GEMM"]
    if with_torch:
        header += ["torch GFLOP/s", "of GEMM", "cnnd/torch"]
    body = []
    for r in rows:
        cn = Timing(**r["cnnd"]).median
        cells = [r["model"], str(r["layer"]), r["conv"], r["output"]]
        cells += [f"{r['mflop_per_sample']:.2f}", f"{cn / 1e9:.1f}", f"{cn / gemm_rate:.0%}"]
        if with_torch:
            th = Timing(**r["torch"]).median
            cells += [f"{th / 1e9:.1f}", f"{th / gemm_rate:.0%}", f"{cn / th:.2f}"]
        body.append(cells)
    return _table(header, body, "llll".ljust(len(header), "r"))


def format_memory(mem: dict[str, Any]) -> str:
    lines = [
        f"peak RSS, {mem['model']} batch-{mem['batch']} training, {mem['steps']} steps, "
        "one subprocess per engine:"
    ]
    for fw in ("cnnd", "torch"):
        if fw not in mem:
            continue
        r = mem[fw]
        if "error" in r:
            lines.append(f"  {fw:<6} failed: {r['error']}")
            continue
        base = r["after_import_mib"]
        extra = f" (after imports {base:.0f} MiB)" if base is not None else ""
        lines.append(f"  {fw:<6} {r['peak_rss_mib']:.0f} MiB{extra}")
    return "\n".join(lines)


def format_report(results: dict[str, Any]) -> str:
    with_torch = results["machine"]["torch"] != "not used"
    gemm = results["gemm"]
    gemm_rate = Timing(**gemm["timings"][gemm["reference"]]).median
    sections = [
        format_header(results),
        "",
        "Throughput (samples/s, median over windows; ±% = half the min-max range / median)",
        format_throughput(results["throughput"], with_torch),
        "",
        format_gemm(gemm),
        "",
        f"Conv forward kernel alone at batch {CONV_BATCH} "
        f"(of GEMM = fraction of the {gemm['reference']} rate)",
        format_conv(results["conv_layers"], gemm_rate, with_torch),
        "",
        format_memory(results["memory"]),
        "",
        f"total runtime {results['runtime_s']:.0f} s",
    ]
    return "\n".join(sections)


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short windows (a smoke test)")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per measurement")
    p.add_argument("--json", type=Path, help="also write all results to this file")
    p.add_argument("--threads", type=int, help="threads for cnnd, torch and GEMM (default: all)")
    p.add_argument("--no-torch", action="store_true", help="cnnd columns only")
    p.add_argument(
        "--cold-compile",
        action="store_true",
        help="also time Numba compilation with an empty cache (subprocess, ~40 s on 2 cores)",
    )
    p.add_argument("--memory-probe", choices=("cnnd", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe-steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def make_settings(args: argparse.Namespace) -> Settings:
    import numba

    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise SystemExit(f"--threads must be in [1, {numba.config.NUMBA_NUM_THREADS}]")
    return Settings(
        quick=args.quick,
        repeats=args.repeats,
        window_s=0.05 if args.quick else 0.5,
        threads=threads,
        probe_steps=args.probe_steps or (5 if args.quick else 20),
    )


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    import numba

    t_start = time.perf_counter()
    cpu_start = _cpu_seconds()
    numba.set_num_threads(settings.threads)
    torch = import_torch(not args.no_torch)
    if torch is not None:
        torch.set_num_threads(settings.threads)
    results: dict[str, Any] = {"settings": asdict(settings) | {"label": settings.label}}
    cnnd_sides = {name: CnndSide(spec) for name, spec in MODELS.items()}
    results["jit"] = jit_warmup(cnnd_sides)
    _progress("numba warm-up")
    if args.cold_compile:
        results["cold_compile"] = run_compile_probe(settings)
    results["machine"] = machine_info(settings, torch)
    torch_sides: dict[str, TorchSide] = {}
    if torch is not None:
        for name, cn in cnnd_sides.items():
            torch_sides[name] = TorchSide(torch, MODELS[name], cn.initial)
        results["equivalence"] = {
            name: check_equivalence(cnnd_sides[name], th, MODELS[name])
            for name, th in torch_sides.items()
        }
        _check_tolerances(results["equivalence"])
    # Everything allocated so far lives to the end; freezing it keeps each gc.collect() in
    # measure() to milliseconds (a full collection with torch loaded takes ~0.1 s).
    gc.collect()
    gc.freeze()
    results["throughput"] = bench_throughput(cnnd_sides, torch_sides, settings)
    results["gemm"] = bench_gemm(settings)
    results["conv_layers"] = bench_conv(cnnd_sides, torch, settings)
    frameworks = ["cnnd"] + (["torch"] if torch is not None else [])
    results["memory"] = run_memory_probes(frameworks, settings)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["runtime_s"] = time.perf_counter() - t_start
    results["machine"]["others_cores_avg"] = _others_cores(cpu_start, results["runtime_s"])
    return results


def _check_tolerances(equivalence: dict[str, dict[str, float]]) -> None:
    for name, eq in equivalence.items():
        if eq["logits_rel"] > 1e-4 or eq["grads_rel"] > 1e-3:
            raise SystemExit(f"{name}: cnnd and torch disagree ({eq}); refusing to compare them")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_probe:
        # Settings need numba only for the thread check; the torch probe must not import it.
        threads = args.threads or os.cpu_count() or 1
        memory_probe(args.memory_probe, Settings(False, 1, 0.0, threads, args.probe_steps or 20))
        return
    import cnnd.core  # noqa: F401  (sets Numba's threading layer and cache before numba loads)

    settings = make_settings(args)
    if args.compile_probe:
        compile_probe(settings)
        return
    results = run(args, settings)
    print(format_report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
