"""The real `cnnd` entry point (a subprocess) against a real server: tables for people,
``--json`` for scripts, and the exit codes the CLI documents (0 success, 2 bad command line
or file, 3 not found, 4 invalid argument, 5 server unreachable, 7 job failed or cancelled).

One server per module; the ``workspace`` fixture creates, uploads and trains through the CLI
itself, and the tests read what it made (anything they add is named uniquely).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnd.client import Client
from tests.client.conftest import LINEAR_SPEC, SLOW_SPEC
from tests.conftest import SMALL_SPEC, free_port

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cnnd_program() -> str:
    """The `cnnd` console script of the environment running the tests."""
    path = Path(sys.executable).with_name("cnnd")
    if path.exists():
        return str(path)
    found = shutil.which("cnnd")
    assert found, "the cnnd console script is not installed (pip install -e .)"
    return found


CNND = cnnd_program()


def run(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNND_")}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [CNND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip


@dataclass
class Workspace:
    target: str
    dir: Path
    x: np.ndarray
    y: np.ndarray
    create: subprocess.CompletedProcess[str]
    upload: subprocess.CompletedProcess[str]
    train: subprocess.CompletedProcess[str]

    def cnnd(self, *args: str, code: int | None = 0, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run `cnnd ARGS --target <server>`; check the exit code unless ``code`` is None."""
        r = run(*args, "--target", self.target, cwd=self.dir, **kw)
        if code is not None:
            assert r.returncode == code, (
                f"cnnd {' '.join(args)} exited {r.returncode}, expected {code}\n"
                f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
            )
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self.cnnd(*args, "--json").stdout)


@pytest.fixture(scope="module")
def ws(
    shared_server: Any,
    tmp_path_factory: pytest.TempPathFactory,
    digits: tuple[np.ndarray, np.ndarray],
) -> Workspace:
    x, y = digits
    d = tmp_path_factory.mktemp("cli")
    (d / "spec.json").write_text(json.dumps(SMALL_SPEC))
    (d / "slow.json").write_text(json.dumps(SLOW_SPEC))
    (d / "linear.json").write_text(json.dumps(LINEAR_SPEC))
    bad = {**SMALL_SPEC, "layers": [{**SMALL_SPEC["layers"][0], "kernel_size": 30}]}
    (d / "bad-spec.json").write_text(json.dumps(bad))
    (d / "not-json.json").write_text("{input_shape: [1, 8, 8]")
    np.savez(d / "data.npz", x=x, y=y)
    np.savez(d / "batch.npz", x=x[:5])
    np.save(d / "x.npy", x[7])  # one sample (C, H, W)
    target = shared_server.target
    create = run("create", "--spec", "spec.json", "--name", "lenet", "--target", target, cwd=d)
    upload = run("upload", "data.npz", "--name", "digits", "--target", target, cwd=d)
    train = run("train", "lenet", "digits", "--epochs", "3", "--optimizer", "adam", "--lr",
                "1e-2", "--validation", "0.1", "--target", target, cwd=d)  # fmt: skip
    return Workspace(target, d, x, y, create, upload, train)


def rows(table: str) -> list[list[str]]:
    """The cells of a table printed by the CLI (header first)."""
    return [line.split() for line in table.strip().splitlines()]


def test_create_upload_train(ws: Workspace) -> None:
    for r in (ws.create, ws.upload, ws.train):
        assert r.returncode == 0, r.stderr
    header, row = rows(ws.create.stdout)
    assert header == ["ID", "NAME", "INPUT", "PARAMS", "VERSION", "CREATED", "BATCHING"]
    assert row[1:5] == ["lenet", "1x8x8", "690", "0"] and row[0].startswith("mdl_")
    assert row[-1] == "default"

    header, row = rows(ws.upload.stdout)
    assert header == ["ID", "NAME", "SAMPLES", "SHAPE", "DTYPE", "CLASSES", "SIZE"]
    assert row[1:6] == ["digits", "1797", "1x8x8", "float32", "10"]
    assert ws.upload.stderr.startswith("upload digits: ") and "MB sent" in ws.upload.stderr

    # Not a terminal: one line per epoch, then the end, all on stderr; stdout stays clean.
    lines = ws.train.stderr.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [e.split("  ")[0] for e in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("val_acc" in e for e in epochs)
    assert lines[-1].startswith("job job_") and lines[-1].endswith(" SUCCEEDED -> version 1")
    assert ws.train.stdout == "" and "\r" not in ws.train.stderr


def test_lists_as_tables_and_json(ws: Workspace) -> None:
    table = rows(ws.cnnd("models", "list").stdout)
    assert table[0][:2] == ["ID", "NAME"] and ["lenet", "1"] in [r[1:2] + r[4:5] for r in table]
    assert rows(ws.cnnd("models").stdout)[0] == table[0]  # "list" is the default action
    models = ws.json("models", "list")
    lenet = next(m for m in models if m["name"] == "lenet")
    assert lenet["latest_version"] == 1 and lenet["input_shape"] == [1, 8, 8]
    assert lenet["versions"][0]["history"][-1]["epoch"] == 3

    assert "digits" in ws.cnnd("datasets", "list").stdout
    datasets = ws.json("datasets", "list")
    assert {"name": "digits", "sample_count": 1797} in [
        {k: d[k] for k in ("name", "sample_count")} for d in datasets]  # fmt: skip

    table = rows(ws.cnnd("jobs", "list", "--model", "lenet").stdout)
    assert table[0] == ["ID", "STATE", "MODEL", "EPOCH", "ACCURACY", "VERSION", "REASON"]
    assert table[1][1:2] + table[1][3:4] + table[1][5:6] == ["SUCCEEDED", "3/3", "1"]
    jobs = ws.json("jobs", "list", "--model", "lenet", "--state", "succeeded")
    assert len(jobs) == 1 and jobs[0]["state"] == "SUCCEEDED"
    assert jobs[0]["config"]["epochs"] == 3 and jobs[0]["config"]["adam"]["lr"] == 0.01
    assert "_client" not in jobs[0]
    assert ws.json("jobs", "list", "--state", "failed", "--model", "lenet") == []
    assert rows(ws.cnnd("jobs", "list", "--state", "queued", "--model", "lenet").stdout)[-1] == [
        "(none)"]  # fmt: skip


def test_get_model_dataset_and_job(ws: Workspace) -> None:
    header, row = rows(ws.cnnd("get-model", "lenet").stdout)
    assert header[:2] == ["ID", "NAME"] and row[1] == "lenet"
    model = ws.json("get-model", "lenet")
    assert model["id"] == row[0] and model["spec"]["input_shape"] == [1, 8, 8]
    assert ws.json("get-model", model["id"])["name"] == "lenet"
    assert ws.json("get-dataset", "digits")["num_classes"] == 10

    job_id = model["versions"][0]["job_id"]
    header, row = rows(ws.cnnd("get-job", job_id).stdout)
    assert header[:2] == ["ID", "STATE"] and row[:2] == [job_id, "SUCCEEDED"]
    job = ws.json("get-job", job_id)
    assert job["result_version"] == 1 and len(job["history"]) == 3


def test_infer_table_and_json(ws: Workspace) -> None:
    out = ws.cnnd("infer", "lenet", "batch.npz").stdout.splitlines()
    assert out[0].startswith("model mdl_") and out[0].endswith(" version 1")
    table = rows("\n".join(out[1:]))
    assert table[0] == ["SAMPLE", "CLASS", "PROBABILITY"]
    assert [r[0] for r in table[1:]] == ["0", "1", "2", "3", "4"]

    result = ws.json("infer", "lenet", "batch.npz")
    with Client(ws.target) as c:
        expected = c.infer("lenet", ws.x[:5])
    assert result["classes"] == expected.classes.tolist()
    assert [r[1] for r in table[1:]] == [str(k) for k in expected.classes]
    np.testing.assert_allclose(result["probabilities"], expected.probabilities, rtol=1e-6)
    assert result["version"] == 1 and np.shape(result["logits"]) == (5, 10)

    one = ws.json("infer", "lenet", "x.npy", "--version", "1")  # one (C, H, W) sample
    assert np.shape(one["logits"]) == (1, 10)


def test_inspect_with_input_and_render(ws: Workspace) -> None:
    r = ws.cnnd("inspect", "lenet", "--input", "x.npy", "--render", "lenet.png")
    assert "model lenet (mdl_" in r.stdout and "version 1" in r.stdout
    assert "conv2d" in r.stdout and "0.weight" in r.stdout and "trained 3 epochs" in r.stdout
    assert "saliency of class" in r.stdout and r.stdout.rstrip().endswith("rendered lenet.png")
    png = (ws.dir / "lenet.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    import matplotlib.image

    image = matplotlib.image.imread(ws.dir / "lenet.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # not a blank canvas

    ins = ws.json("inspect", "lenet", "--input", "batch.npz", "--sample", "2")
    assert ins["version"] == 1 and np.shape(ins["saliency"]) == (1, 1, 8, 8)
    assert list(ins["feature_maps"]) == ["0.conv2d", "1.relu", "2.maxpool2d", "3.flatten",
                                         "4.linear"]  # fmt: skip
    bare = ws.json("inspect", "lenet")
    assert bare["saliency"] is None and bare["feature_maps"] == {}


def test_export_import_delete(ws: Workspace) -> None:
    r = ws.cnnd("export", "lenet", "lenet.npz")
    assert r.stdout.strip() == "exported to lenet.npz"
    with np.load(ws.dir / "lenet.npz") as z:
        assert "__spec__" in z.files and z["0.weight"].shape == (4, 1, 3, 3)
    _, row = rows(ws.cnnd("import", "lenet.npz", "--name", "lenet-copy").stdout)
    assert row[1] == "lenet-copy" and row[4] == "1"
    assert ws.json("infer", "lenet-copy", "batch.npz")["logits"] == ws.json(
        "infer", "lenet", "batch.npz")["logits"]  # fmt: skip
    assert ws.json("export", "lenet-copy", "copy.npz") == {"path": "copy.npz"}
    assert ws.json("delete-model", "lenet-copy") == {"deleted": "model", "id": "lenet-copy"}
    assert ws.cnnd("delete-model", "lenet-copy", code=3).returncode == 3


def test_batching_create_update_and_import(ws: Workspace) -> None:
    r = ws.cnnd("create", "--spec", "spec.json", "--name", "batched", "--max-batch-size", "8",
                "--max-queue-delay-us", "200")  # fmt: skip
    assert rows(r.stdout)[1][-1] == "size<=8,delay<=200us"
    assert ws.json("get-model", "batched")["batching"] == {
        "max_batch_size": 8, "max_queue_delay_us": 200, "enabled": True}  # fmt: skip

    # Only the flags given change...
    assert rows(ws.cnnd("update-model", "batched", "--no-batching").stdout)[1][-1] == "off"
    model = ws.json("update-model", "batched", "--batching", "--max-queue-delay-us", "50")
    assert model["batching"] == {"max_batch_size": 8, "max_queue_delay_us": 50, "enabled": True}
    # ...unless --reset-batching, which starts from the server's settings.
    model = ws.json("update-model", model["id"], "--reset-batching", "--max-batch-size", "4")
    assert model["batching"] == {"max_batch_size": 4, "max_queue_delay_us": None, "enabled": True}
    assert rows(ws.cnnd("get-model", "batched").stdout)[1][-1] == "size<=4"
    assert rows(ws.cnnd("update-model", "batched", "--reset-batching").stdout)[1][-1] == "default"

    r = ws.cnnd("update-model", "batched", code=2)
    assert r.stderr.startswith("cnnd: nothing to update: give --max-batch-size")
    r = ws.cnnd("update-model", "batched", "--max-batch-size", "0", code=4)
    assert r.stderr.startswith("cnnd: INVALID_ARGUMENT: batching.max_batch_size must be in [1, ")
    r = ws.cnnd("create", "--spec", "spec.json", "--name", "late", "--max-queue-delay-us",
                "2000000", code=4)  # fmt: skip
    assert "batching.max_queue_delay_us must be in [0, 1000000]" in r.stderr
    ws.cnnd("update-model", "nope", "--max-batch-size", "2", code=3)

    ws.cnnd("export", "lenet", "for-batching.npz")
    r = ws.cnnd("import", "for-batching.npz", "--name", "imported-solo", "--no-batching")
    assert rows(r.stdout)[1][-1] == "off"
    assert ws.json("infer", "imported-solo", "batch.npz")["logits"] == ws.json(
        "infer", "lenet", "batch.npz")["logits"]  # fmt: skip


def test_cancel_and_watch(ws: Workspace) -> None:
    ws.cnnd("create", "--spec", "slow.json", "--name", "slow")
    job = ws.json("train", "slow", "digits", "--epochs", "1000", "--batch-size", "4", "--detach")
    assert job["state"] in ("QUEUED", "RUNNING") and job["id"].startswith("job_")
    r = ws.cnnd("cancel", job["id"])
    assert r.stdout.strip() == f"job {job['id']}: cancel requested"
    r = ws.cnnd("watch", job["id"], code=7)
    assert r.stderr.splitlines()[-1] == f"job {job['id']} CANCELLED: cancelled by request"
    assert ws.cnnd("cancel", job["id"], code=4).stderr.startswith("cnnd: FAILED_PRECONDITION")
    assert ws.json("get-job", job["id"])["state"] == "CANCELLED"


def test_health(ws: Workspace) -> None:
    assert ws.cnnd("health").stdout == "SERVING\n"
    assert ws.json("health") == {"status": "SERVING"}


# --- errors and exit codes ------------------------------------------------------------------


def test_unknown_model_exits_3_with_a_hint(ws: Workspace) -> None:
    for args in (("get-model", "nope"), ("infer", "nope", "batch.npz"), ("export", "nope", "n.npz"),
                 ("train", "nope", "digits"), ("inspect", "nope")):  # fmt: skip
        r = ws.cnnd(*args, code=3)
        assert r.stderr.startswith("cnnd: NOT_FOUND: no model with id or name 'nope'"), r.stderr
        assert "hint: list what exists with `cnnd models list`" in r.stderr
        assert r.stdout == ""
    assert not (ws.dir / "n.npz").exists()
    assert ws.cnnd("get-job", "job_0123456789abcdef", code=3).stderr.startswith("cnnd: NOT_FOUND")


def test_invalid_arguments_exit_4(ws: Workspace) -> None:
    r = ws.cnnd("create", "--spec", "bad-spec.json", "--name", "bad", code=4)
    assert r.stderr.startswith("cnnd: INVALID_ARGUMENT: layer 0 (conv2d): kernel 30x30")
    r = ws.cnnd("create", "--spec", "spec.json", "--name", "lenet", code=4)  # exists
    assert r.stderr.startswith("cnnd: ALREADY_EXISTS")
    r = ws.cnnd("train", "lenet", "digits", "--validation", "1.5", code=4)
    assert "validation_fraction" in r.stderr
    np.save(ws.dir / "wrong.npy", np.zeros((2, 1, 9, 9), np.float32))
    r = ws.cnnd("infer", "lenet", "wrong.npy", code=4)
    assert "expects [N, 1, 8, 8]" in r.stderr


def test_bad_command_lines_and_files_exit_2(ws: Workspace) -> None:
    cases = {
        ("upload", "missing.npz", "--name", "m"): "cnnd: no such file: missing.npz",
        ("infer", "lenet", "missing.npy"): "cnnd: no such file: missing.npy",
        ("inspect", "lenet", "--input", "missing.npy"): "cnnd: no such file: missing.npy",
        ("import", "missing.npz", "--name", "m"): "cnnd: no such file: missing.npz",
        ("create", "--spec", "missing.json", "--name", "m"): "cnnd: cannot read missing.json",
        ("create", "--spec", "not-json.json", "--name", "m"): "is not valid JSON",
        ("upload", "spec.json", "--name", "m"): "not a .npy/.npz file",
        ("upload", "batch.npz", "--name", "m"): "expected one of ['y', 'labels', 'Y']",
        ("export", "lenet", "no/such/dir/m.npz"): "no such directory",
        ("inspect", "lenet", "--render", "no/such/dir/m.png"): "no such directory",
        ("train", "lenet"): "the following arguments are required: dataset",
        ("train", "lenet", "digits", "--optimizer", "rmsprop"): "invalid choice: 'rmsprop'",
        ("frobnicate",): "invalid choice: 'frobnicate'",
    }
    for args, message in cases.items():
        r = ws.cnnd(*args, code=2)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_failed_job_exits_7(ws: Workspace) -> None:
    ws.cnnd("create", "--spec", "linear.json", "--name", "linear")
    r = ws.cnnd("train", "linear", "digits", "--epochs", "2", "--lr", "1e6", code=7)
    last = r.stderr.splitlines()[-1]
    assert " FAILED: non-finite loss at epoch 1 step " in last, r.stderr
    jobs = ws.json("jobs", "list", "--model", "linear", "--state", "failed")
    assert len(jobs) == 1 and "non-finite loss" in jobs[0]["failure_reason"]
    r = ws.cnnd("train", "linear", "digits", "--epochs", "2", "--lr", "1e6", "--json", code=7)
    assert json.loads(r.stdout)["state"] == "FAILED"


def test_server_down_exits_5_with_a_hint(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = run("models", "list", "--target", f"127.0.0.1:{free_port()}", cwd=tmp_path)
    seconds = time.monotonic() - t0
    assert r.returncode == 5, r.stderr
    assert r.stderr.startswith("cnnd: UNAVAILABLE: failed to connect")
    assert "hint: is the server running? start one with `cnnd serve`, or pass --target" in r.stderr
    assert seconds < 15
    r = run("health", "--target", f"127.0.0.1:{free_port()}", cwd=tmp_path)
    assert r.returncode == 5 and "is the server running" in r.stderr


def test_silent_server_exits_5_at_the_deadline(silent_tcp: str, tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = run("models", "list", "--target", silent_tcp, "--timeout", "1", cwd=tmp_path)
    assert r.returncode == 5 and r.stderr.startswith("cnnd: DEADLINE_EXCEEDED"), r.stderr
    assert "hint: the server did not answer in time" in r.stderr
    assert time.monotonic() - t0 < 10
