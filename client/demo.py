"""`cnnd demo`: the whole service on real data, in one command.

Starts a server in this process (unless --target names one), uploads scikit-learn's digits
(1,797 real 8x8 handwritten digits, shipped inside its wheel, so it works offline), creates a
small CNN, trains it with a live progress bar, reports accuracy on a held-out stratified 20%,
classifies a few test images and prints an inspection of the trained model.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from cnnd.client._client import Client

SPEC = {
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.25},
        {"type": "linear", "out_features": 64},
        {"type": "relu"},
        {"type": "linear", "out_features": 10},
    ],
}


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 (N, 1, 8, 8) in [0, 1], split 80/20 per class."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("cnnd demo needs scikit-learn for its data: pip install scikit-learn")
    from cnnd.core.train import stratified_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = y.astype(np.int64)
    train, test = stratified_split(y, 0.2, seed)
    return x[train], y[train], x[test], y[test]


@contextlib.contextmanager
def local_server(data_dir: str | None) -> Iterator[str]:
    from cnnd.server import logs
    from cnnd.server.app import create_server
    from cnnd.server.config import ServerConfig

    logs.configure("text", "WARNING")
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cnnd-demo-"))
        server, port = create_server(ServerConfig(port=0, data_dir=data_dir))
        server.start()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            server.stop(5)


def _free_suffix(c: Client) -> str:
    """ "" the first time on a server (so the model is plainly "digits-cnn"), else a time."""
    names = {m.name for m in c.list_models()} | {d.name for d in c.list_datasets()}
    if not names & {"digits-cnn", "digits-train", "digits-test"}:
        return ""
    return "-" + time.strftime("%Y%m%d-%H%M%S")


def run_demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        target = args.target
        if not target:
            print("starting an in-process cnnd server ...")
            target = stack.enter_context(local_server(args.data_dir))
        c = stack.enter_context(Client(target, token=args.token, timeout=args.timeout))
        c.wait_until_ready(120)
        print(f"server {target} is SERVING")
        x_train, y_train, x_test, y_test = load_digits_split()
        suffix = _free_suffix(c)
        train = c.upload_dataset(x_train, y_train, name=f"digits-train{suffix}", num_classes=10)
        test = c.upload_dataset(x_test, y_test, name=f"digits-test{suffix}", num_classes=10)
        print(f"uploaded {train.name} ({train.sample_count} images) and {test.name} "
              f"({test.sample_count})")  # fmt: skip
        model = c.create_model(SPEC, name=f"digits-cnn{suffix}", seed=0)
        print(f"created {model.name}: {model.parameter_count:,} parameters\n")
        job = c.train(
            model, train, epochs=args.epochs, batch_size=32, optimizer="adam", lr=2e-3,
            validation=test, seed=0, schedule="cosine",
        )  # fmt: skip
        final = job.wait(progress=True)
        if final.state != "SUCCEEDED":
            print(f"training {final.state}: {final.failure_reason}", file=sys.stderr)
            return 7
        result = c.infer(model, x_test)
        accuracy = float(np.mean(result.classes == y_test))
        print(f"\ntest accuracy: {accuracy:.2%} on {len(y_test)} held-out digits")
        print("\nsample  true  predicted  probability")
        for i in range(8):
            k = int(result.classes[i])
            print(f"{i:6d}  {y_test[i]:4d}  {k:9d}  {result.probabilities[i, k]:11.4f}")
        print()
        from cnnd.client.cli import show_inspection

        ins = c.inspect(model, input=x_test[0], include_weights=bool(args.render))
        show_inspection(ins)
        if args.render:
            from cnnd.client.render import render_inspection

            render_inspection(ins, args.render, x_test[:1])
            print(f"rendered {args.render}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0 if accuracy >= 0.97 else 1
