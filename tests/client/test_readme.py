"""README.md as a specification: its commands are the ones CI runs, its quick start demo runs
as written, its SDK snippet runs against a real server, every `cnnd ...` line it shows parses,
and its "Calling cnnd from another service" request works through `buf curl` and reflection.
"""

from __future__ import annotations

import ast
import base64
import inspect
import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnd.client import Client, InferResult, Inspection, Job
from cnnd.client import _errors as errors
from cnnd.client.cli import EXIT_CODES, build_parser
from cnnd.v1 import service_pb2
from tests.client.conftest import running_server
from tests.conftest import ROOT, SMALL_SPEC, need_program

README = (ROOT / "README.md").read_text()
CI_RUN = (ROOT / ".ci" / "run").read_text()
README_TARGET = "127.0.0.1:50051"


def section(title: str) -> str:
    """The text of README's ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def shell_lines(script: str) -> list[str]:
    """Logical lines of a shell script: continuations joined, blank lines dropped."""
    return [line.strip() for line in script.replace("\\\n", " ").splitlines() if line.strip()]


def cnnd_command_lines() -> list[list[str]]:
    """The argument lists of every `cnnd ...` command in README's sh blocks."""
    out = []
    for block in code_blocks(README, "sh"):
        for line in shell_lines(block):
            for part in line.split("&&"):
                if Path(part.split()[0]).name != "cnnd":
                    continue  # (a grpcurl line continues inside its quotes)
                out.append(shlex.split(part, comments=True)[1:])
    return out


# --- quick start ----------------------------------------------------------------------------


def quick_start() -> tuple[str, str, str]:
    blocks = code_blocks(section("Quick start"), "sh")
    assert len(blocks) == 2, blocks
    install, test = shell_lines(blocks[0])
    (demo,) = shell_lines(blocks[1])
    return install, test, demo


def test_quick_start_commands_are_the_ones_ci_runs() -> None:
    install, test, demo = quick_start()
    assert install == "python3 -m venv .venv && .venv/bin/pip install -e '.[test]'"
    assert test == ".venv/bin/python -m pytest"
    assert demo == ".venv/bin/cnnd demo"
    ci = shell_lines(CI_RUN)
    assert install in ci and test in ci, "README's install and test commands must be CI's"
    assert ci.index(install) < ci.index(test)
    # ... run from the repository root, as README's relative paths assume.
    assert ci.index('cd "$(dirname "$0")/.."') < ci.index(install)


@pytest.mark.slow
def test_quick_start_demo_runs_as_written() -> None:
    """`.venv/bin/cnnd demo` from the repository root: exit 0, test accuracy >= 97%, and
    well under two minutes once the Numba cache is warm."""
    _, _, demo = quick_start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNND_")}
    t0 = time.monotonic()
    r = subprocess.run(shlex.split(demo), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600, check=False)  # fmt: skip
    seconds = time.monotonic() - t0
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    match = re.search(r"^test accuracy: ([\d.]+)% on (\d+) held-out digits$", r.stdout, re.M)
    assert match, r.stdout
    assert float(match.group(1)) >= 97 and int(match.group(2)) == 359
    assert "job job_" in r.stderr and "SUCCEEDED -> version 1" in r.stderr  # the progress
    assert "saliency of class" in r.stdout  # the inspection
    assert seconds < 120, f"the demo took {seconds:.0f} s"


# --- Python SDK -----------------------------------------------------------------------------


def sdk_blocks() -> tuple[str, str]:
    blocks = code_blocks(section("Python SDK"), "python")
    assert len(blocks) == 2, blocks
    return blocks[0], blocks[1]


def test_sdk_snippet_names_exist() -> None:
    """Every ``c.<method>(...)`` of the snippet binds to Client's signature, and the other
    names it uses exist on the types they come from."""
    snippet, _ = sdk_blocks()
    tree = ast.parse(snippet)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
             and n.func.value.id == "c"]  # fmt: skip
    assert {call.func.attr for call in calls} == {  # type: ignore[attr-defined]
        "create_model", "upload_dataset", "train", "infer", "inspect", "export_model"}  # fmt: skip
    for call in calls:
        method = getattr(Client, call.func.attr)  # type: ignore[attr-defined]
        args = [None] * len(call.args)
        kwargs = {k.arg: None for k in call.keywords if k.arg}
        inspect.signature(method).bind(None, *args, **kwargs)  # TypeError if it does not fit
    assert "job.wait()" in snippet and callable(Job.wait)
    assert {"state", "history"} <= {f.name for f in Job.__dataclass_fields__.values()}
    for name in re.search(r"# (\.logits \.probabilities \.classes)", snippet).group(1).split():  # type: ignore[union-attr]
        assert name[1:] in InferResult.__dataclass_fields__
    assert {"layers", "parameters", "feature_maps", "saliency"} <= set(
        Inspection.__dataclass_fields__)  # fmt: skip
    for name in re.findall(r"`cnnd\.client\.(\w+)`", section("Python SDK")):
        assert hasattr(__import__("cnnd.client", fromlist=[name]), name), name
    for name in ("NotFound", "InvalidArgument", "Unavailable"):
        assert issubclass(getattr(errors, name), errors.CnndError)


@pytest.mark.torch
def test_sdk_snippet_runs(
    server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README's SDK snippet, run as written (only the server address differs) on 28x28
    images, then its PyTorch snippet loads the export into a matching torch.nn.Sequential."""
    torch = pytest.importorskip("torch")
    snippet, torch_snippet = sdk_blocks()
    assert snippet.count(f'"{README_TARGET}"') == 1
    snippet = snippet.replace(f'"{README_TARGET}"', repr(server.target))
    rng = np.random.default_rng(0)
    scope: dict[str, Any] = {
        "x_train": rng.random((96, 1, 28, 28), dtype=np.float32),
        "y_train": np.arange(96) % 10,
        "x_test": rng.random((16, 1, 28, 28), dtype=np.float32),
    }
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md (Python SDK)", "exec"), scope)
    job, result, ins = scope["job"], scope["result"], scope["ins"]
    assert job.state == "SUCCEEDED" and len(job.history) == 10
    assert result.logits.shape == (16, 10) and ins.saliency.shape == (1, 1, 28, 28)
    err = capsys.readouterr().err
    assert "epoch 10/10  loss " in err and f"job {job.id} SUCCEEDED -> version 1" in err
    assert (tmp_path / "lenet.npz").is_file()

    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(6 * 14 * 14, 10))  # fmt: skip
    exec(compile(torch_snippet, "README.md (PyTorch)", "exec"),
         {"np": np, "torch": torch, "net": net})  # fmt: skip
    with torch.no_grad():
        logits = net(torch.from_numpy(scope["x_test"][:16])).numpy()
    np.testing.assert_allclose(logits, result.logits, rtol=1e-4, atol=1e-5)


# --- the cnnd command -----------------------------------------------------------------------


def test_every_cnnd_line_parses() -> None:
    lines = cnnd_command_lines()
    commands = set()
    for words in lines:
        try:
            args = build_parser().parse_args(words)
        except SystemExit as e:  # argparse's way of refusing a command line
            pytest.fail(f"README's `cnnd {shlex.join(words)}` does not parse (exit {e.code})")
        commands.add(args.command)
    assert commands >= {"demo", "serve", "create", "upload", "train", "models", "infer",
                        "inspect", "export", "import"}  # fmt: skip


def test_serve_flags_have_the_environment_variables_readme_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = section("Run the server")
    flag, env = re.search(r"\(`(--[\w-]+)` is `(CNND_\w+)`\)", text).groups()  # type: ignore[union-attr]
    monkeypatch.setenv(env, "3")
    args = build_parser().parse_args(["serve"])
    assert getattr(args, flag[2:].replace("-", "_")) == 3


def test_exit_codes_are_the_ones_readme_lists() -> None:
    text = " ".join(section("The `cnnd` command").split("Exit codes:")[1].split())
    listed = dict(re.findall(r"(\d) ([^,.]+)", text))
    by_code: dict[int, set[str]] = {}
    for cls, code in EXIT_CODES.items():
        by_code.setdefault(code, set()).add(cls.__name__)
    assert by_code == {
        3: {"NotFound"},
        4: {"InvalidArgument", "AlreadyExists", "FailedPrecondition"},
        5: {"Unavailable", "DeadlineExceeded"},
        6: {"Unauthenticated", "PermissionDenied"},
        7: {"JobFailed"},
        8: {"ResourceExhausted"},
    }
    assert listed == {
        "0": "success", "1": "unexpected error", "2": "bad command line", "3": "not found",
        "4": "invalid argument / already exists / failed precondition",
        "5": "server unreachable", "6": "not authenticated / not permitted",
        "7": "the job failed or was cancelled", "8": "a limit was hit",
    }  # fmt: skip


# --- calling cnnd from another service ------------------------------------------------------


@pytest.fixture
def buf(monkeypatch: pytest.MonkeyPatch) -> str:
    """`buf` (from npm's @bufbuild/buf): where .ci/run installs it, or a local npm install."""
    dirs = [
        ROOT / ".ci" / "tools" / "node_modules" / ".bin",
        Path("/tmp/buftest/node_modules/.bin"),
    ]
    path = os.pathsep.join([str(d) for d in dirs if d.is_dir()] + [os.environ.get("PATH", "")])
    monkeypatch.setenv("PATH", path)
    return need_program("buf")


@pytest.fixture(scope="module")
def digits_cnn(
    tmp_path_factory: pytest.TempPathFactory, digits: tuple[np.ndarray, np.ndarray]
) -> Iterator[Any]:
    """A server holding a trained model named "digits-cnn" (1x8x8 float32 input)."""
    x, y = digits
    with running_server(tmp_path_factory.mktemp("buf") / "data") as srv:
        with Client(srv.target) as c:
            model = c.create_model(SMALL_SPEC, name="digits-cnn")
            data = c.upload_dataset(x, y, name="digits")
            assert c.train(model, data, epochs=2, lr=0.1).wait(progress=False).state == (
                "SUCCEEDED"
            )
        yield srv


def readme_request_body() -> str:
    """The JSON body README's grpcurl command sends, built by README's own shell line."""
    (block,) = code_blocks(section("Calling cnnd from another service"), "sh")[:1]
    capture = 'grpcurl() { while [ $# -gt 0 ]; do [ "$1" = -d ] && { printf %s "$2"; return; }; shift; done; return 1; }\n'  # noqa: E501
    r = subprocess.run(["bash", "-c", capture + block], capture_output=True, text=True,
                       check=True)  # fmt: skip
    return r.stdout


def buf_curl_infer(body: str, target: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """README's `buf curl` command, run as written (but for the address) with ``body`` as
    its request.json."""
    blocks = code_blocks(section("Calling cnnd from another service"), "sh")
    (command,) = [line for b in blocks for line in shell_lines(b) if line.startswith("buf curl")]
    assert command.count(README_TARGET) == 1
    (cwd / "request.json").write_text(body)
    return subprocess.run(["bash", "-c", command.replace(README_TARGET, target)], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def check_infer_reply(r: subprocess.CompletedProcess[str], target: str) -> None:
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["version"] == "1" and reply["modelId"].startswith("mdl_")
    for key in ("logits", "probabilities"):
        assert reply[key]["shape"] == ["1", "10"] and reply[key]["dtype"] == "DATA_TYPE_FLOAT32"
    logits = np.frombuffer(base64.b64decode(reply["logits"]["data"]), "<f4").reshape(1, 10)
    probabilities = np.frombuffer(base64.b64decode(reply["probabilities"]["data"]), "<f4")
    with Client(target) as c:
        expected = c.infer("digits-cnn", np.zeros((1, 1, 8, 8), np.float32))
    np.testing.assert_array_equal(logits, expected.logits)
    np.testing.assert_allclose(probabilities.sum(), 1, rtol=1e-5)
    assert reply["classes"] == [str(expected.classes[0])]


def test_readme_request_body_is_256_zero_bytes() -> None:
    body = json.loads(readme_request_body())
    assert body["model_id"] == "digits-cnn" and body["input"]["shape"] == [1, 1, 8, 8]
    assert base64.b64decode(body["input"]["data"]) == bytes(256)


def test_readme_infer_request_through_buf_curl(buf: str, digits_cnn: Any, tmp_path: Path) -> None:
    """The README's exact request body, through buf curl and server reflection."""
    check_infer_reply(buf_curl_infer(readme_request_body(), digits_cnn.target, tmp_path),
                      digits_cnn.target)  # fmt: skip


def test_every_method_is_reachable_by_reflection(buf: str, digits_cnn: Any) -> None:
    url = f"http://{digits_cnn.target}"
    flags = ["--protocol", "grpc", "--http2-prior-knowledge"]
    r = subprocess.run([buf, "curl", *flags, "--list-methods", url], capture_output=True,
                       text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    listed = {line for line in r.stdout.splitlines() if line.startswith("cnnd.v1.")}
    service = service_pb2.DESCRIPTOR.services_by_name["CnndService"]
    assert listed == {f"{service.full_name}/{m.name}" for m in service.methods}
    assert "grpc.health.v1.Health/Check" in r.stdout

    # Reflection serves whole schemas: other methods' requests and replies work as JSON too.
    r = subprocess.run([buf, "curl", *flags, "-d", '{"model_id": "digits-cnn"}',
                        f"{url}/cnnd.v1.CnndService/GetModel"],
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    model = json.loads(r.stdout)["model"]
    assert model["name"] == "digits-cnn" and model["latestVersion"] == "1"
