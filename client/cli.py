"""The ``cnnd`` command: run the server, drive it from a shell, or see it work (``cnnd demo``).

Tables for people by default, ``--json`` for scripts. Exit codes:

    0  success                        5  server unreachable or shutting down (UNAVAILABLE)
    1  unexpected error               6  UNAUTHENTICATED or PERMISSION_DENIED
    2  bad command line               7  the job ended FAILED or CANCELLED
    3  NOT_FOUND                      8  RESOURCE_EXHAUSTED (a limit was hit)
    4  INVALID_ARGUMENT, ALREADY_EXISTS or FAILED_PRECONDITION
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from cnnd.client import _errors as errors
from cnnd.client._client import TLS, Client
from cnnd.client._types import Batching, Dataset, Inspection, Job, Model

EXIT_CODES: dict[type[errors.CnndError], int] = {
    errors.NotFound: 3,
    errors.InvalidArgument: 4,
    errors.AlreadyExists: 4,
    errors.FailedPrecondition: 4,
    errors.Unavailable: 5,
    errors.DeadlineExceeded: 5,
    errors.Unauthenticated: 6,
    errors.PermissionDenied: 6,
    errors.JobFailed: 7,
    errors.ResourceExhausted: 8,
}
HINTS: dict[type[errors.CnndError], str] = {
    errors.Unavailable: "is the server running? start one with `cnnd serve`, or pass --target",
    errors.Unauthenticated: "pass a token with --token or CNND_TOKEN",
    errors.PermissionDenied: "this token's role may not do that; use an admin token",
    errors.NotFound: "list what exists with `cnnd models list` / `cnnd datasets list`",
    errors.DeadlineExceeded: "the server did not answer in time; is --target a cnnd server? "
    "raise --timeout for slow calls",
}


class CliError(Exception):
    """A problem with the command's own input (a file, a flag): exit code 2."""


# --- output ------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-ready data. Dataclasses go field by field (not ``asdict``, which deep-copies
    every value, such as the Client a Job keeps in ``_client``); private fields are left out."""
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in fields(value)
            if not f.name.startswith("_")
        }
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def print_json(value: Any) -> None:
    print(json.dumps(_plain(value), indent=2))


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not rows:
        print("(none)")


def _shape(s: Sequence[int]) -> str:
    return "x".join(map(str, s))


def _when(t: datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _batching(b: Batching) -> str:
    """A BATCHING cell: "off", "default" (the server's settings) or what the model sets."""
    if not b.enabled:
        return "off"
    parts = []
    if b.max_batch_size is not None:
        parts.append(f"size<={b.max_batch_size}")
    if b.max_queue_delay_us is not None:
        parts.append(f"delay<={b.max_queue_delay_us}us")
    return ",".join(parts) or "default"


def show_models(models: list[Model], as_json: bool) -> None:
    if as_json:
        return print_json(models)
    print_table(
        [
            (
                m.id,
                m.name,
                _shape(m.input_shape),
                f"{m.parameter_count:,}",
                m.latest_version,
                _when(m.created),
                _batching(m.batching),
            )
            for m in models
        ],
        ("ID", "NAME", "INPUT", "PARAMS", "VERSION", "CREATED", "BATCHING"),
    )
    return None


def show_datasets(datasets: list[Dataset], as_json: bool) -> None:
    if as_json:
        return print_json(datasets)
    print_table(
        [
            (
                d.id,
                d.name,
                d.sample_count,
                _shape(d.sample_shape),
                d.dtype,
                d.num_classes,
                f"{d.size_bytes / 1e6:.1f} MB",
            )
            for d in datasets
        ],
        ("ID", "NAME", "SAMPLES", "SHAPE", "DTYPE", "CLASSES", "SIZE"),
    )
    return None


def show_jobs(jobs: list[Job], as_json: bool) -> None:
    if as_json:
        return print_json(jobs)
    rows = []
    for j in jobs:
        p = j.progress
        where = f"{p.epoch}/{p.epochs}" if p.epochs else "-"
        last = j.history[-1] if j.history else None
        acc = (
            f"{last.val_accuracy if last.val_accuracy is not None else last.accuracy:.4f}"
            if (last)
            else "-"
        )
        rows.append(
            (
                j.id,
                j.state,
                j.model_id,
                where,
                acc,
                j.result_version or "-",
                j.failure_reason[:60] or "-",
            )
        )
    print_table(rows, ("ID", "STATE", "MODEL", "EPOCH", "ACCURACY", "VERSION", "REASON"))
    return None


def show_inspection(ins: Inspection) -> None:
    m = ins.model
    version = f"version {ins.version}" if ins.version else "initial weights (never trained)"
    print(
        f"model {m.name} ({m.id}), {version}: {m.parameter_count:,} parameters, "
        f"{m.macs:,} MACs per sample"
    )
    print_table(
        [
            (
                l.index,
                l.type,
                _shape(l.output_shape),
                f"{l.parameters:,}",
                f"{l.macs:,}",
                f"{_shape(l.receptive_field)} (jump {_shape(l.jump)})"
                if l.receptive_field
                else "whole input",
            )
            for l in ins.layers
        ],
        ("#", "LAYER", "OUTPUT", "PARAMS", "MACS", "RECEPTIVE FIELD"),
    )
    print()
    print_table(
        [
            (
                p.name,
                _shape(p.shape),
                f"{p.mean:+.4f}",
                f"{p.std:.4f}",
                f"{p.min:+.4f}",
                f"{p.max:+.4f}",
                f"{p.l2_norm:.3f}",
            )
            for p in ins.parameters
        ],
        ("PARAMETER", "SHAPE", "MEAN", "STD", "MIN", "MAX", "L2"),
    )
    history = ins.history.get(ins.version, [])
    if history:
        last = history[-1]
        val = f", val_acc {last.val_accuracy:.4f}" if last.val_accuracy is not None else ""
        print(
            f"\ntrained {len(history)} epochs: loss {last.loss:.4f}, acc {last.accuracy:.4f}{val}"
        )
    if ins.saliency is not None and ins.logits is not None:
        print(
            f"input scored as class {int(np.argmax(ins.logits))}; saliency of class "
            f"{ins.target_class}: |dL/dx| max {np.abs(ins.saliency).max():.4g}"
        )


# --- inputs ------------------------------------------------------------------------------


def load_arrays(path: str) -> dict[str, np.ndarray]:
    """Arrays of a .npz or .npy file, read without pickle."""
    p = Path(path)
    if not p.is_file():
        raise CliError(f"no such file: {path}")
    with p.open("rb") as f:
        magic = f.read(6)
    if magic[:4] != b"PK\x03\x04" and magic != b"\x93NUMPY":  # zip (.npz) or .npy
        raise CliError(f"{path}: not a .npy/.npz file (numpy.save / numpy.savez write them)")
    try:
        if p.suffix == ".npy":
            return {"x": np.load(p, allow_pickle=False)}
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        raise CliError(f"{path}: cannot read arrays without pickle ({e})") from e
    except OSError as e:
        raise CliError(f"{path}: not a .npy/.npz file ({e})") from e


def pick(arrays: dict[str, np.ndarray], names: Sequence[str], path: str) -> np.ndarray:
    for n in names:
        if n in arrays:
            return arrays[n]
    if len(arrays) == 1 and names[0] in ("x", "images"):
        return next(iter(arrays.values()))
    raise CliError(f"{path} has arrays {sorted(arrays)}; expected one of {list(names)}")


# --- commands ----------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    tls: TLS | bool | None = None
    if args.tls or args.tls_ca or args.tls_cert:
        tls = TLS(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    return Client(args.target, token=args.token, tls=tls, timeout=args.timeout)


def cmd_serve(args: argparse.Namespace) -> int:
    from cnnd.server.cli import run_serve

    return run_serve(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from cnnd.client.demo import run_demo

    return run_demo(args)


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.what == "models":
            show_models(c.list_models(), args.json)
        elif args.what == "datasets":
            show_datasets(c.list_datasets(), args.json)
        else:
            show_jobs(c.list_jobs(model=args.model, state=args.state), args.json)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.what == "model":
            m = c.get_model(args.id)
            print_json(m) if args.json else show_models([m], False)
        elif args.what == "dataset":
            d = c.get_dataset(args.id)
            print_json(d) if args.json else show_datasets([d], False)
        else:
            j = c.get_job(args.id)
            print_json(j) if args.json else show_jobs([j], False)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.what == "model":
            c.delete_model(args.id)
        else:
            c.delete_dataset(args.id)
    if args.json:
        print(json.dumps({"deleted": args.what, "id": args.id}))
    else:
        print(f"deleted {args.what} {args.id}")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    try:
        spec = json.loads(Path(args.spec).read_text())
    except OSError as e:
        raise CliError(f"cannot read {args.spec}: {e}") from e
    except json.JSONDecodeError as e:
        raise CliError(f"{args.spec} is not valid JSON: {e}") from e
    with _client(args) as c:
        m = c.create_model(spec, name=args.name, seed=args.seed, batching=_batching_of(args))
    print_json(m) if args.json else show_models([m], False)
    return 0


def _batching_of(args: argparse.Namespace) -> Batching:
    return Batching(args.max_batch_size, args.max_queue_delay_us, args.batching is not False)


def cmd_update_model(args: argparse.Namespace) -> int:
    given = {"max_batch_size": args.max_batch_size, "max_queue_delay_us": args.max_queue_delay_us,
             "enabled": args.batching}  # fmt: skip
    fields = None if args.reset_batching else [f for f, v in given.items() if v is not None]
    if fields == []:
        raise CliError(
            "nothing to update: give --max-batch-size, --max-queue-delay-us, "
            "--batching / --no-batching or --reset-batching"
        )
    with _client(args) as c:
        m = c.update_model(args.model, batching=_batching_of(args), fields=fields)
    print_json(m) if args.json else show_models([m], False)
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    arrays = load_arrays(args.file)
    x = pick(arrays, ("x", "images", "X"), args.file)
    y = pick(arrays, ("y", "labels", "Y"), args.file)
    with _client(args) as c:
        d = c.upload_dataset(
            x, y, name=args.name, num_classes=args.num_classes, progress=not args.json
        )
    print_json(d) if args.json else show_datasets([d], False)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    validation: float | str | None = args.validation
    if validation is not None:
        with contextlib.suppress(ValueError):  # else a dataset id or name
            validation = float(validation)
    schedule = None
    if args.schedule == "step":
        schedule = {"kind": "step", "step_size": args.step_size, "gamma": args.gamma}
    elif args.schedule == "cosine":
        schedule = {"kind": "cosine"}
    with _client(args) as c:
        job = c.train(
            args.model,
            args.dataset,
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            validation=validation,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            patience=args.patience,
            schedule=schedule,
        )
        if args.detach:
            print_json(job) if args.json else print(f"job {job.id} {job.state}")
            return 0
        final = job.wait(progress=not args.json)
    if args.json:
        print_json(final)
    return 0 if final.state == "SUCCEEDED" else EXIT_CODES[errors.JobFailed]


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "cancel":
            job = c.cancel_job(args.id)
            print_json(job) if args.json else print(f"job {job.id}: cancel requested")
            return 0
        final = c.wait_job(args.id, progress=not args.json)
    if args.json:
        print_json(final)
    return 0 if final.state == "SUCCEEDED" else EXIT_CODES[errors.JobFailed]


def cmd_infer(args: argparse.Namespace) -> int:
    arrays = load_arrays(args.input)
    x = pick(arrays, ("x", "images", "X"), args.input)
    with _client(args) as c:
        r = c.infer(args.model, x, version=args.version)
    if args.json:
        print_json(r)
        return 0
    top = np.sort(r.probabilities, axis=1)[:, -1]
    rows = [(i, int(k), f"{p:.4f}") for i, (k, p) in enumerate(zip(r.classes, top, strict=True))]
    print(f"model {r.model_id} version {r.version}")
    print_table(rows, ("SAMPLE", "CLASS", "PROBABILITY"))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.render and not Path(args.render).parent.is_dir():
        raise CliError(f"cannot write {args.render}: no such directory {Path(args.render).parent}")
    x = None
    if args.input:
        x = pick(load_arrays(args.input), ("x", "images", "X"), args.input)
        if x.ndim == 4:
            if not 0 <= args.sample < len(x):
                raise CliError(f"--sample {args.sample}: {args.input} holds {len(x)} samples")
            x = x[args.sample : args.sample + 1]
        elif x.ndim == 3:
            x = x[None]  # one (C, H, W) sample
    with _client(args) as c:
        ins = c.inspect(
            args.model,
            version=args.version,
            input=x,
            target_class=args.target_class,
            include_weights=bool(args.render),
        )
    if args.json:
        print_json(ins)
    else:
        show_inspection(ins)
    if args.render:
        from cnnd.client.render import render_inspection

        render_inspection(ins, args.render, None if x is None else np.asarray(x, np.float32))
        if not args.json:
            print(f"rendered {args.render}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if not out.parent.is_dir():
        raise CliError(f"cannot write {args.output}: no such directory {out.parent}")
    with _client(args) as c:
        path = c.export_model(args.model, out, version=args.version)
    print(json.dumps({"path": str(path)}) if args.json else f"exported to {path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if not Path(args.file).is_file():
        raise CliError(f"no such file: {args.file}")
    with _client(args) as c:
        m = c.import_model(args.file, name=args.name, batching=_batching_of(args))
    print_json(m) if args.json else show_models([m], False)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as c:
        status = c.health()
    print(json.dumps({"status": status}) if args.json else status)
    return 0 if status == "SERVING" else EXIT_CODES[errors.Unavailable]


# --- parser ------------------------------------------------------------------------------


def _connection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument(
        "--target",
        default=os.environ.get("CNND_TARGET", "127.0.0.1:50051"),
        help="server address (env CNND_TARGET; default 127.0.0.1:50051)",
    )
    g.add_argument(
        "--token", default=os.environ.get("CNND_TOKEN"), help="bearer token (env CNND_TOKEN)"
    )
    g.add_argument("--tls", action="store_true", help="use TLS with the system's roots")
    g.add_argument("--tls-ca", help="CA certificate that signed the server's")
    g.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    g.add_argument("--tls-key", help="client key (mutual TLS)")
    g.add_argument("--tls-server-name", help="name to check in the server's certificate")
    g.add_argument("--timeout", type=float, default=60.0, help="deadline per call, seconds")
    g.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _batching_flags(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("dynamic batching of Infer (default: the server's settings)")
    g.add_argument("--max-batch-size", type=int, metavar="N", help="most samples in one batch")
    g.add_argument("--max-queue-delay-us", type=int, metavar="N",
                   help="longest a batch waits for more calls, in microseconds")  # fmt: skip
    g.add_argument("--batching", action=argparse.BooleanOptionalAction,
                   help="--no-batching: run each Infer call alone")  # fmt: skip
    return g


def build_parser(serve_flags: bool = True) -> argparse.ArgumentParser:
    """The whole command line. ``serve_flags=False`` leaves out the flags of `cnnd serve`,
    whose definitions import the engine (Numba, SciPy): `main` does that for every other
    command, so that `cnnd models list` and friends start in a fraction of the time."""
    parser = argparse.ArgumentParser(
        prog="cnnd",
        description="Train and serve small convolutional networks.",
        epilog="Run `cnnd demo` to see the whole service work on real data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str, conn: bool = True):  # type: ignore[no-untyped-def]
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        if conn:
            _connection_flags(p)
        return p

    serve = add("serve", cmd_serve, "run the server", conn=False)
    if serve_flags:
        from cnnd.server.cli import add_serve_flags

        add_serve_flags(serve)

    p = add("demo", cmd_demo, "train on the digits data set and serve it, in one command")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--data-dir", help="data dir of the in-process server (default: temporary)")
    p.add_argument("--render", help="also draw kernels, feature maps and saliency to this PNG")
    p.set_defaults(target=os.environ.get("CNND_TARGET"))  # none given: an in-process server

    for what in ("models", "datasets", "jobs"):
        p = add(what, cmd_list, f"list {what}")
        p.add_argument("action", choices=["list"], nargs="?", default="list")
        p.set_defaults(what=what)
        if what == "jobs":
            p.add_argument("--model", help="only this model's jobs")
            p.add_argument(
                "--state", choices=["queued", "running", "succeeded", "failed", "cancelled"]
            )
    for what in ("model", "dataset", "job"):
        p = add(f"get-{what}", cmd_get, f"show one {what}")
        p.add_argument("id", help=f"{what} id" + (" or name" if what != "job" else ""))
        p.set_defaults(what=what)
    for what in ("model", "dataset"):
        p = add(f"delete-{what}", cmd_delete, f"delete a {what}")
        p.add_argument("id")
        p.set_defaults(what=what)

    p = add("create", cmd_create, "create a model from a JSON spec")
    p.add_argument("--spec", required=True, help="JSON file: {input_shape, layers}")
    p.add_argument("--name", required=True)
    p.add_argument("--seed", type=int, default=0)
    _batching_flags(p)

    p = add("update-model", cmd_update_model, "change how a model's Infer calls are batched")
    p.add_argument("model", help="model id or name")
    _batching_flags(p).add_argument(
        "--reset-batching", action="store_true",
        help="back to the server's settings, but for the flags given here",
    )  # fmt: skip

    p = add("upload", cmd_upload, "upload a dataset from a .npz holding x (N,C,H,W) and y (N,)")
    p.add_argument("file")
    p.add_argument("--name", required=True)
    p.add_argument("--num-classes", type=int)

    p = add("train", cmd_train, "train a model on a dataset, with a live progress bar")
    p.add_argument("model")
    p.add_argument("dataset")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--validation", help="a fraction in (0, 1) or a dataset id/name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--patience", type=int)
    p.add_argument("--schedule", choices=["constant", "step", "cosine"], default="constant")
    p.add_argument("--step-size", type=int, default=10)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--detach", action="store_true", help="return once the job is queued")

    p = add("watch", cmd_jobs, "follow a job until it ends")
    p.add_argument("id")
    p.set_defaults(action="watch")
    p = add("cancel", cmd_jobs, "cancel a job")
    p.add_argument("id")
    p.set_defaults(action="cancel")

    p = add("infer", cmd_infer, "classify the images of a .npz/.npy file")
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("--version", type=int)

    p = add("inspect", cmd_inspect, "layers, parameter statistics, feature maps and saliency")
    p.add_argument("model")
    p.add_argument("--version", type=int)
    p.add_argument("--input", help=".npy/.npz with one sample (C,H,W) or a batch (see --sample)")
    p.add_argument("--sample", type=int, default=0, help="which sample of a batch")
    p.add_argument("--target-class", type=int)
    p.add_argument("--render", help="draw kernels, feature maps and saliency to this PNG")

    p = add("export", cmd_export, "save a model as .npz (PyTorch state_dict names + spec)")
    p.add_argument("model")
    p.add_argument("output")
    p.add_argument("--version", type=int)

    p = add("import", cmd_import, "create a model from an exported .npz")
    p.add_argument("file")
    p.add_argument("--name", required=True)
    _batching_flags(p)

    add("health", cmd_health, "print SERVING or NOT_SERVING")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(serve_flags=bool(argv) and argv[0] == "serve")
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except CliError as e:
        print(f"cnnd: {e}", file=sys.stderr)
        return 2
    except errors.CnndError as e:
        code = next((c for cls, c in EXIT_CODES.items() if isinstance(e, cls)), 1)
        hint = next((h for cls, h in HINTS.items() if isinstance(e, cls)), "")
        print(f"cnnd: {e}", file=sys.stderr)
        for field, why in e.fields.items():
            if why != e.message:
                print(f"  {field}: {why}", file=sys.stderr)
        if hint:
            print(f"  hint: {hint}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
