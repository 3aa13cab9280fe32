"""Hardening against hostile clients, each proved over a real channel:

* nothing a client sends becomes a file path (names and ids with traversal, absolute paths,
  backslashes, NUL, overlong or look-alike characters are INVALID_ARGUMENT and touch no file);
* nothing is ever unpickled (object arrays are refused; a live pickle exploit never runs);
* sizes are checked with Python ints before anything is allocated (the server's peak resident
  memory does not move), messages and uploads over their limits are RESOURCE_EXHAUSTED and
  leave no temporary file;
* the API's concurrency limit refuses exactly the calls beyond it while health answers, and the
  job queue refuses the job beyond its limit;
* NaN and infinity never enter inference or a dataset, and a diverging job fails fast, keeps its
  last finite checkpoint and leaves memory flat.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cnnd.client import Client, FailedPrecondition
from cnnd.core import load_npz
from cnnd.server.app import Server, create_server
from cnnd.server.config import Limits, ServerConfig
from cnnd.v1 import datasets_pb2 as dp
from cnnd.v1 import inference_pb2 as ip
from cnnd.v1 import jobs_pb2 as jp
from cnnd.v1 import models_pb2 as mp
from cnnd.v1 import service_pb2_grpc
from cnnd.v1 import tensor_pb2 as tp
from tests.conftest import ROOT, SMALL_SPEC, ServerProcess, wait_for

C = grpc.StatusCode
F32, U8 = tp.DATA_TYPE_FLOAT32, tp.DATA_TYPE_UINT8
GOOD_SPEC = mp.ModelSpec(
    input_shape=[1, 8, 8],
    layers=[mp.Layer(flatten=mp.Flatten()), mp.Layer(linear=mp.Linear(out_features=10))],
)
MiB = 1 << 20


# --- helpers -----------------------------------------------------------------------------


def start_in_process(data_dir: Path, **limits: int) -> tuple[Server, str]:
    """A started in-process server with ``limits`` on a free port; (server, target)."""
    srv, port = create_server(ServerConfig(port=0, data_dir=str(data_dir), limits=Limits(**limits)))
    srv.start()
    return srv, f"127.0.0.1:{port}"


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    """The status a call ends with (streams are read to their end)."""
    try:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as e:
        return e.code()
    return C.OK


def tensor(shape: list[int], dtype: int = F32, data: bytes | None = None) -> tp.Tensor:
    """A Tensor of zeros whose byte length matches ``shape`` unless ``data`` is given."""
    if data is None:
        data = b"\0" * (int(np.prod(shape)) * (4 if dtype == F32 else 1))
    return tp.Tensor(shape=shape, dtype=dtype, data=data)


def upload_requests(
    name: str, images: np.ndarray, labels: np.ndarray, num_classes: int = 10
) -> list[dp.UploadDatasetRequest]:
    """A complete, consistent upload (right sizes and checksum) of ``images``."""
    img, lab = images.tobytes(), labels.astype("<i4").tobytes()
    dtype = U8 if images.dtype == np.uint8 else F32
    header = dp.DatasetHeader(
        name=name, sample_shape=list(images.shape[1:]), dtype=dtype, num_classes=num_classes,
        sample_count=len(labels), sha256=hashlib.sha256(img + lab).hexdigest(),
    )  # fmt: skip
    return [
        dp.UploadDatasetRequest(header=header),
        dp.UploadDatasetRequest(images=img),
        dp.UploadDatasetRequest(labels=lab),
    ]


def import_requests(name: str, data: bytes) -> list[mp.ImportModelRequest]:
    header = mp.ImportModelHeader(name=name, size_bytes=len(data))
    chunks = [data[i : i + (256 << 10)] for i in range(0, len(data), 256 << 10)]
    return [mp.ImportModelRequest(header=header)] + [mp.ImportModelRequest(chunk=c) for c in chunks]


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=a.dtype.hasobject)
    return buf.getvalue()


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """Only the header of a .npy announcing ``shape`` (what numpy would allocate)."""
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def spec_entry() -> bytes:
    layers = [{"type": "flatten"}, {"type": "linear", "out_features": 10}]
    spec = {"input_shape": [1, 8, 8], "layers": layers}
    return npy(np.array(json.dumps(spec)))


def zip_of(members: dict[str, bytes], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def zip_bomb(expanded: int) -> bytes:
    """A valid .npz whose weight array is ``expanded`` bytes of zeros, deflated to ~1/1000."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("__spec__.npy", spec_entry())
        with z.open("1.weight.npy", "w", force_zip64=True) as f:
            f.write(npy_header((expanded // 4,)))
            block = b"\0" * MiB
            for _ in range(expanded // MiB):
                f.write(block)
    return buf.getvalue()


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so a later peak is this window's."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def spawn_module(tmp: Path, *flags: str) -> ServerProcess:
    """A ready `cnnd serve` with ``flags`` and its data dir in ``tmp``; the caller closes it."""
    server = ServerProcess(tmp / "data", *flags)
    server.wait_ready(180)
    return server


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, digits: tuple[np.ndarray, np.ndarray]
) -> Iterator[dict[str, Any]]:
    """One in-process server beside a trained model "m", an untrained "u" and a dataset "d"."""
    root = tmp_path_factory.mktemp("live")
    srv, target = start_in_process(root / "data")
    client = Client(target, timeout=60)
    try:
        client.wait_until_ready(180)
        x, y = digits
        client.create_model(SMALL_SPEC, name="m")
        client.create_model(SMALL_SPEC, name="u")
        client.upload_dataset(x[:64], y[:64], name="d", num_classes=10)
        job = client.train("m", "d", epochs=1, batch_size=16)
        assert job.wait(progress=False, timeout=120).state == "SUCCEEDED"
        exported = b"".join(
            r.chunk for r in client.stub.ExportModel(mp.ExportModelRequest(model_id="m"))
        )
        yield {"server": srv, "root": root, "data": root / "data", "client": client,
               "stub": client.stub, "job": job.id, "exported": exported}  # fmt: skip
    finally:
        client.close()
        srv.stop(5)


# --- (4) nothing a client sends becomes a file path ------------------------------------------

HOSTILE_NAMES = [
    "",
    ".",
    "..",
    "../escape-1",
    "../../../../escape-2",
    "ok/../../escape-3",
    "%2e%2e%2fescape-4",
    "..%2fescape-5",
    "%2e%2e",
    "/etc/passwd",
    "/tmp/escape-6",
    "~/escape-7",
    "..\\escape-8",
    "a\\..\\..\\escape-9",
    "C:\\escape-10",
    "escape-11\x00.npz",
    "\x00",
    "escape-12\n",
    "x" * 65,
    "y" * 100_000,
    "．．／escape-13",  # fullwidth full stops and solidus
    "\u2024\u2024/escape-14",  # one-dot leaders
    "m\u043edel",  # Cyrillic o
    "escape\u202e15",  # right-to-left override
    "ｅｓｃａｐｅ16",
    "escape-17\u2215x",  # division slash
    "a b",
    "-leading-dash",
]


def _name_calls(
    stub: service_pb2_grpc.CnndServiceStub, name: str, exported: bytes
) -> dict[str, Callable[[], Any]]:
    """Every place a name or id enters the API, with everything else in the request valid."""
    images = np.zeros((2, 1, 8, 8), np.float32)
    sample = tensor([1, 1, 8, 8])

    def stream_code() -> Any:
        replies = list(stub.InferStream(iter([ip.InferStreamRequest(
            request=ip.InferRequest(model_id=name, input=sample))]), timeout=30))  # fmt: skip
        assert len(replies) == 1 and replies[0].error.code == C.INVALID_ARGUMENT.value[0]
        raise _Code(C.INVALID_ARGUMENT)

    train = dict(epochs=1, batch_size=1)
    return {
        "CreateModel": lambda: stub.CreateModel(mp.CreateModelRequest(name=name, spec=GOOD_SPEC)),
        "UploadDataset": lambda: stub.UploadDataset(
            iter(upload_requests(name, images, np.array([0, 1]))), timeout=30
        ),
        "ImportModel": lambda: stub.ImportModel(iter(import_requests(name, exported)), timeout=30),
        "GetModel": lambda: stub.GetModel(mp.GetModelRequest(model_id=name)),
        "DeleteModel": lambda: stub.DeleteModel(mp.DeleteModelRequest(model_id=name)),
        "ExportModel": lambda: stub.ExportModel(mp.ExportModelRequest(model_id=name), timeout=30),
        "Inspect": lambda: stub.Inspect(ip.InspectRequest(model_id=name, input=sample)),
        "Infer": lambda: stub.Infer(ip.InferRequest(model_id=name, input=sample)),
        "InferStream": stream_code,
        "GetDataset": lambda: stub.GetDataset(dp.GetDatasetRequest(dataset_id=name)),
        "DeleteDataset": lambda: stub.DeleteDataset(dp.DeleteDatasetRequest(dataset_id=name)),
        "Train.model_id": lambda: stub.Train(jp.TrainRequest(
            model_id=name, dataset_id="d", **train)),
        "Train.dataset_id": lambda: stub.Train(jp.TrainRequest(
            model_id="m", dataset_id=name, **train)),
        "Train.validation_dataset_id": lambda: stub.Train(jp.TrainRequest(
            model_id="m", dataset_id="d", validation_dataset_id=name or "x/", **train)),
        "GetJob": lambda: stub.GetJob(jp.GetJobRequest(job_id=name)),
        "CancelJob": lambda: stub.CancelJob(jp.CancelJobRequest(job_id=name)),
        "WatchJob": lambda: stub.WatchJob(jp.WatchJobRequest(job_id=name), timeout=30),
        "ListJobs.model_id": lambda: stub.ListJobs(jp.ListJobsRequest(model_id=name or "x/")),
        "ListModels.page_token": lambda: stub.ListModels(mp.ListModelsRequest(
            page_token=base64.urlsafe_b64encode(name.encode()).decode() or "%%")),
    }  # fmt: skip


class _Code(Exception):
    """Carries a status out of an in-stream error (InferStream answers errors in place)."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code


def _tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` outside ``skip``, with its size and modification time."""
    out = {}
    for path in root.rglob("*"):
        if path == skip or skip in path.parents:
            continue
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


ID = r"[a-z]{1,4}_[0-9a-f]{16}"
DATA_LAYOUT = re.compile(
    rf"cnnd\.db(-wal|-shm|-journal)?|lock|tmp|blobs|blobs/(models|datasets|checkpoints)"
    rf"|blobs/models/(?P<m>{ID})(/v[0-9]+\.npz)?"
    rf"|blobs/datasets/(?P<d>{ID})(/(images|labels)\.bin)?"
    rf"|blobs/checkpoints/(?P<j>{ID})\.npz"
)


def test_client_names_never_become_paths(live: dict[str, Any]) -> None:
    """Traversal, encoded traversal, absolute paths, backslashes, NUL, overlong and
    look-alike names are INVALID_ARGUMENT wherever a name or id enters the API; nothing is
    written outside the data dir, and inside it every path is one the server named itself."""
    stub, root, data = live["stub"], live["root"], live["data"]
    passwd = os.stat("/etc/passwd")
    before = _tree(root, skip=data)
    outside_before = {p.name for d in (Path.cwd(), Path.cwd().parent) for p in d.iterdir()}
    wrong = []
    absolute = root / "abs-escape"  # an absolute path beside the data dir
    for name in [*HOSTILE_NAMES, str(absolute), str(data / "blobs" / "escape-18")]:
        for where, call in _name_calls(stub, name, live["exported"]).items():
            try:
                code = code_of(call)
            except _Code as e:
                code = e.code
            if code != C.INVALID_ARGUMENT:
                wrong.append((where, name[:40], code.name))
    assert wrong == [], wrong
    assert _tree(root, skip=data) == before, "something was written beside the data dir"
    outside_after = {p.name for d in (Path.cwd(), Path.cwd().parent) for p in d.iterdir()}
    assert not {n for n in outside_after - outside_before if "escape" in n}
    assert os.stat("/etc/passwd").st_mtime_ns == passwd.st_mtime_ns
    assert not Path("/tmp/escape-6").exists() and not absolute.exists()
    models = {m.id for m in stub.ListModels(mp.ListModelsRequest()).models}
    datasets = {d.id for d in stub.ListDatasets(dp.ListDatasetsRequest()).datasets}
    jobs = {j.id for j in stub.ListJobs(jp.ListJobsRequest()).jobs}
    for path in sorted(data.rglob("*")):
        rel = path.relative_to(data).as_posix()
        match = DATA_LAYOUT.fullmatch(rel)
        assert match, f"unexpected path in the data dir: {rel!r}"
        assert match["m"] in models | {None}, rel
        assert match["d"] in datasets | {None}, rel
        assert match["j"] in jobs | {None}, rel
    assert list((data / "tmp").iterdir()) == []


# --- (5) no pickle anywhere ------------------------------------------------------------------


class Exploit:
    """A pickle that creates ``path`` when it is loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickles_are_refused_and_never_run(live: dict[str, Any]) -> None:
    """An .npz with an object array is INVALID_ARGUMENT, and a live exploit (proved live here
    first) sent as an archive, inside one, as tensor bytes or as dataset bytes never runs."""
    stub, root = live["stub"], live["root"]
    armed = root / "armed"
    pickle.loads(pickle.dumps(Exploit(armed))).close()
    assert armed.exists(), "the exploit must work when unpickled, or this test proves nothing"
    marker = root / "PWNED"
    payload = pickle.dumps(Exploit(marker))
    object_array = np.array([Exploit(marker), 1], dtype=object)
    good = load_npz(live["exported"])
    archives = {
        "object array beside the weights": npz(**good, extra=np.array([1, "a"], dtype=object)),
        "exploit as an object array": npz(**good, extra=object_array),
        "exploit as the spec": npz(**{**good, "__spec__": object_array}),
        "a raw pickle": payload,
        "a pickle as a zip member": zip_of({"__spec__.npy": payload, "x.npy": payload}),
        "a single object .npy": npy(object_array),
    }
    for i, (what, data) in enumerate(archives.items()):
        with pytest.raises(grpc.RpcError) as info:
            stub.ImportModel(iter(import_requests(f"pickled-{i}", data)), timeout=30)
        assert info.value.code() == C.INVALID_ARGUMENT, (what, info.value.details())
        assert "not a cnnd model archive" in info.value.details(), what
    # As raw bytes a pickle is just data: uint8 pixels, never loaded as an object.
    padded = payload + b"\0" * (-len(payload) % 64)
    images = np.frombuffer(padded, np.uint8).reshape(-1, 1, 8, 8)
    labels = np.arange(len(images)) % 2
    stub.UploadDataset(iter(upload_requests("pickled-pixels", images, labels, 2)), timeout=30)
    stub.Infer(ip.InferRequest(model_id="m", input=tensor([len(images), 1, 8, 8], U8, padded)))
    time.sleep(0.5)
    assert not marker.exists(), "the server unpickled client bytes"


FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                     "marshal"}  # fmt: skip
NUMPY_LOADERS = {"np.load", "numpy.load", "np.lib.format.read_array", "numpy.lib.format.read_array"}
UNPICKLING_CALLS = {"torch.load", "pd.read_pickle", "pandas.read_pickle"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def pickle_problems(source: str, where: str) -> list[str]:
    """Every place in ``source`` that could unpickle: a pickle-family import, a use of
    ``pickle.*``, ``allow_pickle`` not literally False, np.load / read_array without
    ``allow_pickle=False``, numpy's load imported bare, torch.load and friends."""
    problems = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.split(".")[0] == "numpy" and "load" in names:
                    problems.append(f"{where}:{node.lineno}: imports numpy's load bare")
                names.append(node.module)
            for name in names:
                if name.split(".")[0] in FORBIDDEN_MODULES:
                    problems.append(f"{where}:{node.lineno}: imports {name}")
        elif isinstance(node, ast.Attribute) and _dotted(node).split(".")[0] == "pickle":
            problems.append(f"{where}:{node.lineno}: uses {_dotted(node)}")
        elif isinstance(node, ast.Call):
            flag = {k.arg: k.value for k in node.keywords}.get("allow_pickle")
            safe = isinstance(flag, ast.Constant) and flag.value is False
            if flag is not None and not safe:
                problems.append(f"{where}:{node.lineno}: allow_pickle is not False")
            if _dotted(node.func) in UNPICKLING_CALLS:
                problems.append(f"{where}:{node.lineno}: calls {_dotted(node.func)}")
            if _dotted(node.func) in NUMPY_LOADERS and not safe:
                problems.append(f"{where}:{node.lineno}: {_dotted(node.func)} without "
                                "allow_pickle=False")  # fmt: skip
    problems += [f"{where}: {m.group(0)}" for m in re.finditer(r"allow_pickle\s*=\s*True", source)]
    return problems


def test_no_pickle_in_the_source() -> None:
    """No module of server/, client/ or core/ imports a pickle-family loader, passes
    allow_pickle=True, or calls np.load / read_array without allow_pickle=False."""
    files = [p for d in ("server", "client", "core") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20
    problems = [
        problem
        for path in files
        for problem in pickle_problems(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import _pickle as p",
        "from pickle import loads",
        "import joblib",
        "from dill import load",
        "import shelve",
        "import numpy as np\nnp.load(f)",
        "import numpy as np\nnp.load(f, allow_pickle=True)",
        "import numpy as np\nnp.load(f, allow_pickle=flag)",
        "import numpy\nnumpy.load(f, mmap_mode='r')",
        "from numpy import load",
        "import numpy as np\nnp.lib.format.read_array(f)",
        "import torch\ntorch.load(f)",
        "x = pickle.loads(b)",
        "np.savez(f, allow_pickle = True)",
    ],
)
def test_the_pickle_scan_catches(source: str) -> None:
    """The scan above is not vacuous: each of these is reported."""
    assert pickle_problems(source, "example.py")


def test_the_pickle_scan_accepts_safe_loading() -> None:
    """Loading with allow_pickle=False is not reported."""
    assert pickle_problems("import numpy as np\nnp.load(f, allow_pickle=False)", "ok.py") == []


# --- (6) sizes are checked before allocation -------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`cnnd serve` with small limits: 1 MiB messages, 256 KiB datasets, 1M parameters."""
    server = spawn_module(
        tmp_path_factory.mktemp("limited"), "--max-message-bytes", str(MiB),
        "--max-dataset-bytes", str(256 << 10), "--max-parameters", "1000000",
    )  # fmt: skip
    try:
        yield server
    finally:
        server.close()


def _spec(input_shape: list[int], *layers: mp.Layer) -> mp.CreateModelRequest:
    spec = mp.ModelSpec(input_shape=input_shape, layers=list(layers))
    return mp.CreateModelRequest(name="hostile", spec=spec)


FLAT = mp.Layer(flatten=mp.Flatten())
BIG = 2**40


def _hostile_sizes(stub: service_pb2_grpc.CnndServiceStub) -> dict[str, tuple[Any, C]]:
    """Requests announcing absurd sizes, with the status each must get."""

    def header(shape: list[int], count: int = 2) -> Any:
        h = dp.DatasetHeader(name="hostile", sample_shape=shape, dtype=F32, num_classes=10,
                             sample_count=count, sha256="0" * 64)  # fmt: skip
        return lambda: stub.UploadDataset(iter([dp.UploadDatasetRequest(header=h)]), timeout=30)

    def infer(shape: list[int], data: bytes = b"") -> Any:
        return lambda: stub.Infer(ip.InferRequest(model_id="m", input=tp.Tensor(
            shape=shape, dtype=F32, data=data)), timeout=30)  # fmt: skip

    def create(req: mp.CreateModelRequest) -> Any:
        return lambda: stub.CreateModel(req, timeout=30)

    def imported(data: bytes) -> Any:
        return lambda: stub.ImportModel(iter(import_requests("hostile", data)), timeout=30)

    linear = mp.Layer(linear=mp.Linear(out_features=2**31))
    IA, RE = C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED
    return {
        "spec: linear of width 2^31": (create(_spec([1, 8, 8], FLAT, linear)), IA),
        "spec: conv of 2^31 channels": (create(_spec([1, 8, 8], mp.Layer(conv2d=mp.Conv2d(
            out_channels=2**31, kernel_size=[3])))), IA),
        "spec: kernel 2^62": (create(_spec([1, 8, 8], mp.Layer(maxpool2d=mp.MaxPool2d(
            kernel_size=[2**62])))), IA),
        "spec: input whose product overflows int64": (create(_spec([BIG, BIG, BIG], FLAT)), IA),
        "spec: input of 2^63-1 each": (create(_spec([2**63 - 1] * 3, FLAT)), IA),
        "spec: a zero dim": (create(_spec([0, 8, 8], FLAT)), IA),
        "spec: a negative dim": (create(_spec([1, -8, 8], FLAT)), IA),
        "spec: 10^4 layers": (create(_spec([1, 8, 8], *[mp.Layer(relu=mp.ReLU())] * 10_000)), IA),
        "infer: product overflows int64": (infer([BIG, BIG, BIG, BIG]), IA),
        "infer: product just over 2^63": (infer([3037000500, 3037000500, 1, 1]), IA),
        "infer: 2^62 samples": (infer([2**62, 1, 8, 8]), IA),
        "infer: a zero dim": (infer([0, 1, 8, 8]), IA),
        "infer: a negative dim": (infer([1, 1, -8, 8], b"\0" * 256), IA),
        "infer: negative product": (infer([-1, -1, 8, 8], b"\0" * 256), IA),
        "infer: no shape": (infer([], b"\0" * 4), IA),
        "dataset: dims of 2^40": (header([BIG, BIG, BIG]), IA),
        "dataset: a zero dim": (header([1, 0, 8]), IA),
        "dataset: a negative dim": (header([1, 8, -8]), IA),
        "dataset: a negative count": (header([1, 8, 8], -5), IA),
        "dataset: 2^62 samples of 2^48 values (past int64; over quota)": (
            header([65536, 65536, 65536], 2**62), RE),
        "import: a .npy announcing 2^40 floats": (imported(zip_of({
            "__spec__.npy": spec_entry(), "1.weight.npy": npy_header((BIG,)) + b"\0" * 64})), IA),
        "import: a .npy announcing a negative shape": (imported(zip_of({
            "__spec__.npy": spec_entry(), "1.weight.npy": npy_header((-1,)) + b"\0" * 64})), IA),
        "import: a zip bomb (64 MiB in ~64 KiB)": (imported(zip_bomb(64 * MiB)), RE),
    }  # fmt: skip


def test_hostile_sizes_are_refused_before_allocation(limited: ServerProcess) -> None:
    """Widths of 2^31, shapes whose product overflows int64, zero and negative dims, 10^4
    layers, absurd .npy headers and a zip bomb are refused with INVALID_ARGUMENT (or
    RESOURCE_EXHAUSTED for a quota) while the server's peak RSS grows by less than 8 MiB."""
    with limited.client(timeout=60) as c:
        stub = c.stub
        if not any(m.name == "m" for m in c.list_models()):
            c.create_model(SMALL_SPEC, name="m")
            rng = np.random.default_rng(0)
            c.upload_dataset(rng.random((16, 1, 8, 8), np.float32), np.arange(16) % 10, name="d",
                             num_classes=10)  # fmt: skip
            c.train("m", "d", epochs=1).wait(progress=False, timeout=120)
        cases = _hostile_sizes(stub)
        for call, _ in cases.values():  # warm-up: first-call allocations are not the point
            code_of(call)
        reset_peak(limited.proc.pid)
        base = memory_kib(limited.proc.pid)
        wrong = {what: code.name for what, (call, want) in cases.items()
                 if (code := code_of(call)) != want}  # fmt: skip
        after = memory_kib(limited.proc.pid)
    assert wrong == {}
    growth = (after["VmHWM"] - base["VmRSS"]) / 1024
    assert growth < 8, f"peak RSS grew by {growth:.1f} MiB"


def _peak_growth_mib(server: ServerProcess, call: Callable[[], Any]) -> tuple[C, float]:
    """The status of ``call`` and how far the server's peak RSS rose above its RSS before."""
    reset_peak(server.proc.pid)
    base = memory_kib(server.proc.pid)["VmRSS"]
    code = code_of(call)
    return code, (memory_kib(server.proc.pid)["VmHWM"] - base) / 1024


def test_zip_directory_bomb_is_refused_before_parsing(limited: ServerProcess) -> None:
    """An .npz of 200,000 empty members (19 MB, within the import limit) costs the server no
    more peak memory than 19 MB of junk: its directory (~120 MB once parsed) is refused from
    the zip's end record, before zipfile or numpy parse it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(200_000):
            z.writestr(f"{i}.npy", b"")
    bomb = buf.getvalue()
    junk = b"PK" + b"\0" * (len(bomb) - 2)  # the same size, refused at once (not a zip)
    with limited.client(timeout=120) as c:

        def send(data: bytes) -> Callable[[], Any]:
            return lambda: c.stub.ImportModel(iter(import_requests("dir-bomb", data)), timeout=120)

        code_of(send(junk))  # warm-up: buffers of this size
        code, plain = _peak_growth_mib(limited, send(junk))
        assert code == C.INVALID_ARGUMENT
        code, parsed = _peak_growth_mib(limited, send(bomb))
    assert code == C.INVALID_ARGUMENT
    assert parsed - plain < 16, f"peak RSS: {parsed:.0f} MiB for the bomb, {plain:.0f} for junk"


def test_messages_over_the_limit_are_resource_exhausted(limited: ServerProcess) -> None:
    """With --max-message-bytes 1 MiB, a request or a response over it is RESOURCE_EXHAUSTED,
    and a request just under it is served."""
    with limited.client(timeout=60) as c:
        stub = c.stub
        if not any(m.name == "wide" for m in c.list_models()):
            c.create_model({"input_shape": [1, 8, 8], "layers": [
                {"type": "flatten"}, {"type": "linear", "out_features": 4096},
                {"type": "linear", "out_features": 10}]}, name="wide")  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(ip.InferRequest(model_id="wide", input=tensor([4097, 1, 8, 8])))
        assert info.value.code() == C.RESOURCE_EXHAUSTED, info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadDataset(iter([dp.UploadDatasetRequest(images=b"\0" * (MiB + 1))]))
        assert info.value.code() == C.RESOURCE_EXHAUSTED, info.value.details()
        # 1.2 MB of weights in the answer: the server refuses to send it.
        with pytest.raises(grpc.RpcError) as info:
            stub.Inspect(ip.InspectRequest(model_id="wide", include_weights=True))
        assert info.value.code() == C.RESOURCE_EXHAUSTED, info.value.details()
        assert stub.Inspect(ip.InspectRequest(model_id="wide")).model.name == "wide"
        with pytest.raises(grpc.RpcError) as info:  # under the size limit, so it is decoded
            stub.Infer(ip.InferRequest(model_id="wide", input=tensor([4000, 1, 8, 8])))
        assert info.value.code() == C.FAILED_PRECONDITION  # untrained: it got to the handler


def _tmp_entries(server: ServerProcess) -> list[str]:
    tmp = server.log.parent / "data" / "tmp"
    return sorted(p.name for p in tmp.iterdir())


def test_uploads_over_quota_or_announcement_leave_nothing(limited: ServerProcess) -> None:
    """An upload over --max-dataset-bytes is RESOURCE_EXHAUSTED; one that streams more image
    or label bytes than its header announced is aborted mid-stream. Either way the upload's
    temporary directory (seen to exist while the stream was open) is removed and no dataset
    or blob appears."""
    data = limited.log.parent / "data"
    with limited.client(timeout=60) as c:
        stub = c.stub
        names = {d.name for d in c.list_datasets()}
        blobs = sorted((data / "blobs" / "datasets").glob("*"))

        over = dp.DatasetHeader(name="over", sample_shape=[1, 64, 64], dtype=F32, num_classes=2,
                                sample_count=32, sha256="0" * 64)  # 512 KiB > 256 KiB  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadDataset(iter([dp.UploadDatasetRequest(header=over),
                                     dp.UploadDatasetRequest(images=b"\0" * 1024)]))  # fmt: skip
        assert info.value.code() == C.RESOURCE_EXHAUSTED and "limit" in info.value.details()
        assert _tmp_entries(limited) == []

        header = dp.DatasetHeader(name="liar", sample_shape=[1, 8, 8], dtype=F32, num_classes=2,
                                  sample_count=4, sha256="0" * 64)  # 1024 image bytes  # fmt: skip
        for excess in (dp.UploadDatasetRequest(images=b"\0" * 2048),
                       dp.UploadDatasetRequest(labels=b"\0" * 64)):  # fmt: skip
            proceed = threading.Event()

            def requests(
                extra: dp.UploadDatasetRequest = excess, go: threading.Event = proceed
            ) -> Iterator[dp.UploadDatasetRequest]:
                yield dp.UploadDatasetRequest(header=header)
                yield dp.UploadDatasetRequest(images=b"\0" * 512)
                go.wait(30)
                if extra.WhichOneof("part") == "labels":
                    yield dp.UploadDatasetRequest(images=b"\0" * 512)
                yield extra

            future = stub.UploadDataset.future(requests(), timeout=60)
            wait_for(lambda: _tmp_entries(limited), timeout=30, what="the upload's tmp dir")
            proceed.set()
            with pytest.raises(grpc.RpcError) as info:
                future.result()
            assert info.value.code() == C.INVALID_ARGUMENT, info.value.details()
            assert "more" in info.value.details() and "than the header announces" in (
                info.value.details()
            )
            wait_for(lambda: _tmp_entries(limited) == [], timeout=10, what="tmp/ emptied")
        assert {d.name for d in c.list_datasets()} == names
        assert sorted((data / "blobs" / "datasets").glob("*")) == blobs


# --- (7) concurrency and queue limits --------------------------------------------------------

SLOTS, EXTRA, QUEUE = 3, 2, 2


@pytest.fixture(scope="module")
def tight(
    tmp_path_factory: pytest.TempPathFactory, digits: tuple[np.ndarray, np.ndarray]
) -> Iterator[dict[str, Any]]:
    """An in-process server allowing 3 API calls at once and 2 queued jobs."""
    srv, target = start_in_process(tmp_path_factory.mktemp("tight") / "data",
                                   max_concurrent_rpcs=SLOTS, max_queued_jobs=QUEUE)  # fmt: skip
    client = Client(target, timeout=60, retries=0)
    try:
        client.wait_until_ready(180)
        x, y = digits
        client.create_model(SMALL_SPEC, name="m")
        client.upload_dataset(x[:64], y[:64], name="d", num_classes=10)
        yield {"server": srv, "target": target, "client": client}
    finally:
        for job in client.list_jobs():
            if job.state in ("QUEUED", "RUNNING"):
                with contextlib.suppress(FailedPrecondition):  # it ended meanwhile
                    client.cancel_job(job.id)
        client.close()
        srv.stop(5)


def _long_job(client: Client) -> str:
    """A job that runs until cancelled, once it is RUNNING."""
    job = client.train("m", "d", epochs=10_000, batch_size=1)
    wait_for(lambda: client.get_job(job.id).state == "RUNNING", timeout=60, what="RUNNING")
    return job.id


def test_queue_limit(tight: dict[str, Any]) -> None:
    """With max_queued_jobs=2 and one job running, two more queue and the next is
    RESOURCE_EXHAUSTED; cancelling a queued job makes room for exactly one."""
    c: Client = tight["client"]
    running = _long_job(c)
    queued = [c.train("m", "d", epochs=1).id for _ in range(QUEUE)]
    assert [c.get_job(j).state for j in queued] == ["QUEUED"] * QUEUE
    req = jp.TrainRequest(model_id="m", dataset_id="d", epochs=1, batch_size=8)
    with pytest.raises(grpc.RpcError) as info:
        c.stub.Train(req)
    assert info.value.code() == C.RESOURCE_EXHAUSTED and "queued" in info.value.details()
    c.cancel_job(queued[0])
    queued.append(c.stub.Train(req).job.id)
    with pytest.raises(grpc.RpcError) as info:
        c.stub.Train(req)
    assert info.value.code() == C.RESOURCE_EXHAUSTED
    for job in [*queued[1:], running]:  # the queued first: none may start meanwhile
        c.cancel_job(job)
    wait_for(lambda: all(c.get_job(j).state == "CANCELLED" for j in [running, *queued]),
             timeout=30, what="every job cancelled")  # fmt: skip


def test_concurrency_limit_is_exact_and_spares_health(tight: dict[str, Any]) -> None:
    """With max_concurrent_rpcs=3 and 5 WatchJob streams opened at once on a running job,
    exactly 3 are served and 2 get RESOURCE_EXHAUSTED; other API calls are refused while the
    3 are held, health still answers SERVING within a second, and ending one stream frees a
    slot."""
    c: Client = tight["client"]
    job = _long_job(c)
    channel = grpc.insecure_channel(tight["target"])
    stub = service_pb2_grpc.CnndServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    gate = threading.Barrier(SLOTS + EXTRA)
    lock = threading.Lock()
    outcomes: list[str] = []
    held: list[Any] = []

    def watch() -> None:
        gate.wait()
        call = stub.WatchJob(jp.WatchJobRequest(job_id=job), timeout=120)
        try:
            first = next(call)
            outcome = "served" if first.kind == jp.WatchJobResponse.KIND_SNAPSHOT else "?"
            with lock:
                held.append(call)
        except grpc.RpcError as e:
            outcome = e.code().name
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=watch, daemon=True) for _ in range(SLOTS + EXTRA)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(outcomes) == ["RESOURCE_EXHAUSTED"] * EXTRA + ["served"] * SLOTS
        for _ in range(5):
            t0 = time.monotonic()
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - t0 < 1
        with pytest.raises(grpc.RpcError) as info:
            stub.ListModels(mp.ListModelsRequest(), timeout=10)
        assert info.value.code() == C.RESOURCE_EXHAUSTED
        held.pop().cancel()

        def listed() -> bool:
            return code_of(lambda: stub.ListModels(mp.ListModelsRequest(), timeout=10)) == C.OK

        wait_for(listed, timeout=15, interval=0.2, what="a slot freed by the cancelled stream")
    finally:
        for call in held:
            call.cancel()

        # The server frees a slot when it notices the cancellation (within its 0.5 s poll).
        def cancelled() -> bool:
            code = code_of(lambda: c.stub.CancelJob(jp.CancelJobRequest(job_id=job)))
            return code != C.RESOURCE_EXHAUSTED

        wait_for(cancelled, timeout=15, interval=0.2, what="the job cancelled")
        channel.close()


# --- (8) NaN and infinity ------------------------------------------------------------------


def test_non_finite_inputs_are_refused_and_uint8_is_immune(live: dict[str, Any]) -> None:
    """NaN/±inf float32 inputs are INVALID_ARGUMENT in Infer, Inspect, InferStream (in place,
    the stream goes on) and uploads; the same bytes as uint8 are ordinary pixels and pass."""
    stub = live["stub"]
    bad = {
        "nan": np.full((1, 1, 8, 8), np.nan, np.float32),
        "+inf": np.full((1, 1, 8, 8), np.inf, np.float32),
        "one -inf": np.where(np.arange(64).reshape(1, 1, 8, 8) == 5, -np.inf, 0).astype(np.float32),
    }  # fmt: skip
    good = np.zeros((1, 1, 8, 8), np.float32)
    for what, x in bad.items():
        for call in (
            lambda x=x: stub.Infer(ip.InferRequest(model_id="m", input=tensor([1, 1, 8, 8],
                                                                              F32, x.tobytes()))),
            lambda x=x: stub.Inspect(ip.InspectRequest(model_id="m", input=tensor(
                [1, 1, 8, 8], F32, x.tobytes()))),
        ):  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == C.INVALID_ARGUMENT, what
            assert "NaN or infinite" in info.value.details()
    nan_bytes = np.full(16, np.nan, np.float32).tobytes()  # 64 bytes: one uint8 sample
    as_uint8 = tensor([1, 1, 8, 8], U8, nan_bytes)
    reply = stub.Infer(ip.InferRequest(model_id="m", input=as_uint8))
    assert np.isfinite(np.frombuffer(reply.probabilities.data, np.float32)).all()
    stream = [tensor([1, 1, 8, 8], F32, good.tobytes())]
    stream += [tensor([1, 1, 8, 8], F32, x.tobytes()) for x in bad.values()]
    stream += [as_uint8, tensor([1, 1, 8, 8], F32, good.tobytes())]
    requests = [ip.InferStreamRequest(request=ip.InferRequest(model_id="m", input=t,
                                                              request_id=str(i)))
                for i, t in enumerate(stream)]  # fmt: skip
    replies = list(stub.InferStream(iter(requests), timeout=60))
    assert [r.response.request_id for r in replies] == [str(i) for i in range(len(stream))]
    assert [r.error.code for r in replies] == [0] + [C.INVALID_ARGUMENT.value[0]] * 3 + [0, 0]
    assert all("NaN or infinite" in r.error.message for r in replies[1:4])
    # Uploads: float32 NaN is refused, the same bytes as uint8 are a valid dataset.
    images = np.full((2, 1, 8, 8), np.nan, np.float32)
    with pytest.raises(grpc.RpcError) as info:
        stub.UploadDataset(iter(upload_requests("nan-f32", images, np.array([0, 1]))))
    assert info.value.code() == C.INVALID_ARGUMENT and "NaN" in info.value.details()
    pixels = np.frombuffer(images.tobytes(), np.uint8).reshape(8, 1, 8, 8)
    ds = stub.UploadDataset(iter(upload_requests("nan-bytes-u8", pixels, np.arange(8) % 2, 2)))
    assert ds.dataset.sample_count == 8 and ds.dataset.dtype == U8


def _wait_ended(client: Client, job_id: str, timeout: float = 60) -> Any:
    return wait_for(
        lambda: (j := client.get_job(job_id)).state in ("SUCCEEDED", "FAILED", "CANCELLED") and j,
        timeout=timeout, interval=0.05, what=f"job {job_id} to end",
    )  # fmt: skip


NON_FINITE = re.compile(r"^non-finite loss at epoch (\d+) step (\d+)\b")


def test_diverging_job_fails_fast_and_keeps_its_last_finite_checkpoint(
    live: dict[str, Any],
) -> None:
    """sgd lr=1e30 FAILS within seconds with "non-finite loss at epoch E step S"; a job that
    diverges in epoch 2 (lr x1e32 after epoch 1) keeps the epoch-1 checkpoint, whose weights
    are finite, and adds no model version."""
    c: Client = live["client"]
    latest = c.get_model("m").latest_version
    t0 = time.monotonic()
    job = c.stub.Train(jp.TrainRequest(model_id="m", dataset_id="d", epochs=50, batch_size=8,
                                       sgd=jp.Sgd(lr=1e30))).job  # fmt: skip
    ended = _wait_ended(c, job.id)
    assert ended.state == "FAILED", ended
    assert time.monotonic() - t0 < 30
    match = NON_FINITE.match(ended.failure_reason)
    assert match and match[1] == "1", ended.failure_reason
    job = c.stub.Train(jp.TrainRequest(
        model_id="m", dataset_id="d", epochs=5, batch_size=8, checkpoint_every=1,
        sgd=jp.Sgd(lr=0.01), schedule=jp.LrSchedule(step=jp.StepLr(step_size=1, gamma=1e32)),
    )).job  # fmt: skip
    ended = _wait_ended(c, job.id)
    assert ended.state == "FAILED"
    match = NON_FINITE.match(ended.failure_reason)
    assert match and match[1] == "2", ended.failure_reason
    assert [e.epoch for e in ended.history] == [1]
    checkpoint = live["data"] / "blobs" / "checkpoints" / f"{job.id}.npz"
    assert checkpoint.exists(), "the last finite checkpoint must be kept"
    arrays = load_npz(checkpoint.read_bytes())
    weights = {k: v for k, v in arrays.items() if k.startswith("model/")}
    assert weights and all(np.isfinite(v).all() for v in weights.values())
    assert json.loads(str(arrays["__state__"]))["epoch"] == 1
    assert c.get_model("m").latest_version == latest


@pytest.mark.slow
def test_diverging_jobs_leave_memory_flat(
    tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """Twenty diverging jobs in a row: the server's RSS after the last is within 20 MiB of
    its RSS after the third."""
    server = spawn_module(tmp_path)
    try:
        with server.client(timeout=60) as c:
            x, y = digits
            c.create_model(SMALL_SPEC, name="m")
            c.upload_dataset(x[:256], y[:256], name="d", num_classes=10)
            rss = []
            for _ in range(20):
                req = jp.TrainRequest(
                    model_id="m", dataset_id="d", epochs=5, batch_size=16, sgd=jp.Sgd(lr=1e30)
                )
                job = c.stub.Train(req).job
                ended = _wait_ended(c, job.id)
                assert ended.state == "FAILED" and NON_FINITE.match(ended.failure_reason)
                rss.append(memory_kib(server.proc.pid)["VmRSS"] / 1024)
        growth = max(rss[3:]) - rss[2]
        assert growth < 20, f"RSS grew by {growth:.1f} MiB over 17 jobs: {rss}"
    finally:
        server.close()
