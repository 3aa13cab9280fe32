"""Property-based fuzzing of every RPC of cnnd.v1.CnndService against one live `cnnd serve`.

Requests are generated from the service descriptor itself: every field of every request
message is filled (or not) with hostile values — huge and negative ints, NaN and infinities,
traversal and look-alike names, random layer oneofs, tensors whose shape, dtype and byte length
disagree, streams of chunks in any order — so an RPC added later is fuzzed without touching this
file. Whatever comes back must be a documented status (never INTERNAL or UNKNOWN, never a
timeout), and at the end the server must still be up: health SERVING, able to train and infer,
with no "internal error" in its log. A regression found by fuzzing stays as an @example.

CNND_FUZZ_EXAMPLES (default 100) sets the examples per RPC.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cnnd.v1 import datasets_pb2 as dp
from cnnd.v1 import inference_pb2 as ip
from cnnd.v1 import jobs_pb2 as jp
from cnnd.v1 import models_pb2 as mp
from cnnd.v1 import service_pb2
from cnnd.v1 import tensor_pb2 as tp
from tests.conftest import SMALL_SPEC, ServerProcess

pytestmark = pytest.mark.slow

SERVICE = service_pb2.DESCRIPTOR.services_by_name["CnndService"]
C = grpc.StatusCode
DOCUMENTED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION,
              C.RESOURCE_EXHAUSTED, C.OUT_OF_RANGE}  # fmt: skip
DOCUMENTED_VALUES = {c.value[0] for c in DOCUMENTED}
EXAMPLES = int(os.environ.get("CNND_FUZZ_EXAMPLES", "100"))
WATCH_SECONDS = 10
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)  # fmt: skip
WORLD: dict[str, Any] = {}  # what the live server holds, filled by the fixture
TALLY: dict[str, Counter[str]] = {}

# --- strategies, from the descriptor ---------------------------------------------------------

INT_EDGES = [0, 1, 2, 3, 8, 10, 64, 255, 65536, 65537, -1, -2, 2**31 - 1, 2**31, 2**32,
             2**53 + 1, 2**62, 2**63 - 1, -(2**31), -(2**63)]  # fmt: skip
FLOAT_EDGES = [0.0, -0.0, 5e-324, 1e-300, 1e-8, 0.5, 0.999999, 1.0, 1.5, -1.0, 1e6, 1e30, 3.5e38,
               1e300, math.nan, math.inf, -math.inf]  # fmt: skip
HOSTILE_NAMES = ["", ".", "..", "../x", "..\\x", "/etc/passwd", "%2e%2e%2f", "a\x00b", "x" * 65,
                 "．．／x", "m\u043edel", "a b", "-x", "job_../../x",
                 "mdl_0000000000000000"]  # fmt: skip
TEXT = st.characters(exclude_categories=("Cs",))  # any code point protobuf can carry
F32, U8 = tp.DATA_TYPE_FLOAT32, tp.DATA_TYPE_UINT8


def ints(bits: int, signed: bool = True, small: bool = False) -> st.SearchStrategy[int]:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    tiny = st.integers(max(lo, -2), min(hi, 12))
    if small:
        return st.one_of(tiny, tiny, st.sampled_from([v for v in INT_EDGES if lo <= v <= hi]))
    edges = st.sampled_from([v for v in INT_EDGES if lo <= v <= hi])
    return st.one_of(tiny, edges, st.integers(lo, hi))


def floats(small: bool = False) -> st.SearchStrategy[float]:
    if small:
        return st.one_of(st.floats(0, 1), st.sampled_from(FLOAT_EDGES))
    return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats())


def keys(protect: bool = False) -> st.SearchStrategy[str]:
    """Names and ids: ones that exist (not the shared fixtures when ``protect``), well-formed
    ones that do not, hostile ones and arbitrary text."""
    pool = "victims" if protect else "keys"
    return st.one_of(
        st.deferred(lambda: st.sampled_from(WORLD[pool])),
        st.sampled_from(HOSTILE_NAMES),
        st.from_regex(r"[a-z]{1,4}_[0-9a-f]{16}", fullmatch=True),
        st.text(TEXT, max_size=80),
    )


def field_strategy(f: FieldDescriptor, small: bool, protect: bool) -> st.SearchStrategy[Any]:
    if f.message_type is not None:
        element: st.SearchStrategy[Any] = messages(f.message_type, small, protect)
    elif f.enum_type is not None:
        known = [v.number for v in f.enum_type.values]
        element = st.one_of(st.sampled_from(known), ints(32, small=small))
    elif f.type == FieldDescriptor.TYPE_STRING:
        element = keys(protect)
    elif f.type == FieldDescriptor.TYPE_BYTES:
        element = st.binary(max_size=2048)
    elif f.type == FieldDescriptor.TYPE_BOOL:
        element = st.booleans()
    elif f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        element = floats(small)
    else:
        bits = 32 if f.cpp_type in (f.CPPTYPE_INT32, f.CPPTYPE_UINT32) else 64
        signed = f.cpp_type in (f.CPPTYPE_INT32, f.CPPTYPE_INT64)
        element = ints(bits, signed, small)
    return st.lists(element, max_size=5) if f.is_repeated else element


def messages(d: Descriptor, small: bool = False, protect: bool = False) -> st.SearchStrategy[Any]:
    """Any message of type ``d``: each field set or not (several members of a oneof may be
    drawn; the last one set wins, as on the wire)."""
    override = OVERRIDES.get(d.full_name)
    if override is not None:
        return override(small, protect)
    cls = d._concrete_class
    optional = {f.name: field_strategy(f, small, protect) for f in d.fields}
    return st.fixed_dictionaries({}, optional=optional).map(lambda kw: cls(**kw))


@st.composite
def tensors(draw: st.DrawFn, small: bool = False, protect: bool = False) -> tp.Tensor:
    """Mostly the models' (N, 1, 8, 8), else random or absurd shapes; known dtypes mostly;
    data of exactly the right length (random bits, so NaN and inf turn up) or of any length."""
    roll = draw(st.integers(0, 9))  # explicit odds: hypothesis' one_of is not uniform
    dtype = draw(st.sampled_from([F32, U8] if roll < 8 else [0, 3, -7]))
    if roll < 6:
        shape = [draw(st.integers(1, 5)), 1, 8, 8]
    elif roll < 8:
        shape = draw(st.lists(st.integers(-2, 10), max_size=5))
    else:
        shape = draw(st.lists(st.sampled_from(INT_EDGES), min_size=1, max_size=5))
    itemsize = 1 if dtype == U8 else 4
    count = math.prod(shape) if shape and all(d > 0 for d in shape) else 0
    if 0 < count * itemsize <= 65536 and draw(st.integers(0, 4)):
        n = count * itemsize
        if dtype == F32 and draw(st.integers(0, 2)):  # finite values: some calls succeed
            data = np.random.default_rng(draw(st.integers(0, 99))).random(count, "<f4").tobytes()
        else:
            data = draw(st.binary(min_size=n, max_size=n))
    else:
        data = draw(st.binary(max_size=512))
    return tp.Tensor(shape=shape, dtype=dtype, data=data)


SMALL = st.integers(1, 3)
PAIR = st.one_of(st.lists(SMALL, min_size=1, max_size=2), st.just([]))


def _conv(args: dict[str, Any], bias: bool | None) -> mp.Layer:
    conv = mp.Conv2d(**args) if bias is None else mp.Conv2d(bias=bias, **args)
    return mp.Layer(conv2d=conv)


def _spatial_layer() -> st.SearchStrategy[mp.Layer]:
    pair = st.lists(SMALL, min_size=1, max_size=2)
    padding = st.lists(st.integers(0, 2), max_size=2)
    conv_args = st.fixed_dictionaries(
        {"out_channels": st.integers(1, 6), "kernel_size": pair},
        optional={"stride": PAIR, "padding": padding},
    )
    pool_args = st.fixed_dictionaries(
        {"kernel_size": st.lists(st.integers(1, 3), min_size=1, max_size=2)},
        optional={"stride": PAIR, "padding": st.lists(st.integers(0, 1), max_size=2)},
    )
    batchnorm = st.builds(
        mp.BatchNorm2d, eps=st.sampled_from([1e-5, 1e-3, 1.0]), momentum=st.floats(0, 1),
        affine=st.booleans(),
    )  # fmt: skip
    return st.one_of(
        st.builds(_conv, conv_args, st.one_of(st.none(), st.booleans())),
        pool_args.map(lambda a: mp.Layer(maxpool2d=mp.MaxPool2d(**a))),
        pool_args.map(lambda a: mp.Layer(avgpool2d=mp.AvgPool2d(**a))),
        batchnorm.map(lambda b: mp.Layer(batchnorm2d=b)),
        _elementwise_layer(),
    )


def _elementwise_layer() -> st.SearchStrategy[mp.Layer]:
    return st.one_of(
        st.just(mp.Layer(relu=mp.ReLU())), st.just(mp.Layer(tanh=mp.Tanh())),
        st.just(mp.Layer(sigmoid=mp.Sigmoid())),
        st.builds(lambda s: mp.Layer(leaky_relu=mp.LeakyReLU(negative_slope=s)),
                  st.floats(-2, 2)),
        st.builds(lambda p: mp.Layer(dropout=mp.Dropout(p=p)), st.floats(0, 1)),
    )  # fmt: skip


@st.composite
def specs(draw: st.DrawFn, small: bool = False, protect: bool = False) -> mp.ModelSpec:
    """Model specs: anything at all, or a plausible CNN (spatial layers, flatten, dense
    layers) with small random arguments, sometimes with one layer replaced by any layer."""
    if draw(st.integers(0, 3)) == 0:
        return draw(_plain_spec_message(True, protect))
    roll = draw(st.integers(0, 9))
    if roll < 6:
        shape = [draw(st.integers(1, 3)), draw(st.integers(3, 12)), draw(st.integers(3, 12))]
    elif roll < 8:
        shape = [1, 8, 8]
    else:
        shape = draw(st.lists(ints(64, small=True), max_size=4))
    layers = draw(st.lists(_spatial_layer(), max_size=4))
    layers.append(mp.Layer(flatten=mp.Flatten()))
    dense = st.one_of(
        st.builds(lambda o: mp.Layer(linear=mp.Linear(out_features=o)), st.integers(1, 12)),
        _elementwise_layer(),
    )
    layers += draw(st.lists(dense, max_size=3))
    layers.append(mp.Layer(linear=mp.Linear(out_features=draw(st.integers(1, 12)))))
    if draw(st.integers(0, 3)) == 0:
        layers[draw(st.integers(0, len(layers) - 1))] = draw(
            messages(mp.Layer.DESCRIPTOR, small=True)
        )
    return mp.ModelSpec(input_shape=shape, layers=layers)


def _plain_spec_message(small: bool, protect: bool) -> st.SearchStrategy[Any]:
    d = mp.ModelSpec.DESCRIPTOR
    optional = {f.name: field_strategy(f, True, protect) for f in d.fields}
    return st.fixed_dictionaries({}, optional=optional).map(lambda kw: mp.ModelSpec(**kw))


OVERRIDES: dict[str, Callable[[bool, bool], st.SearchStrategy[Any]]] = {
    "cnnd.v1.Tensor": tensors,
    "cnnd.v1.ModelSpec": lambda small, protect: (
        _plain_spec_message(small, protect) if small else specs(small, protect)
    ),
}


# --- streams -------------------------------------------------------------------------------


@st.composite
def coherent_uploads(draw: st.DrawFn) -> list[dp.UploadDatasetRequest]:
    """Uploads whose sizes and checksum agree, so validation reaches labels and values:
    random dtype, values (NaN included), labels (out of range included) and chunking."""
    dtype = draw(st.sampled_from([F32, U8]))
    count = draw(st.integers(1, 6))
    classes = draw(st.one_of(st.integers(2, 12), st.sampled_from([0, 1, -1, 100_001])))
    itemsize = 4 if dtype == F32 else 1
    images = draw(st.binary(min_size=count * 64 * itemsize, max_size=count * 64 * itemsize))
    labels = np.array(draw(st.lists(st.integers(-3, 14), min_size=count, max_size=count)), "<i4")
    lab = labels.tobytes()
    header = dp.DatasetHeader(
        name=draw(NAME if draw(st.booleans()) else keys()), sample_shape=[1, 8, 8], dtype=dtype,
        num_classes=classes,
        sample_count=count, sha256=hashlib.sha256(images + lab).hexdigest(),
    )  # fmt: skip
    cut = draw(st.integers(0, len(images)))
    parts = [dp.UploadDatasetRequest(header=header)]
    parts += [
        dp.UploadDatasetRequest(images=images[:cut]),
        dp.UploadDatasetRequest(images=images[cut:]),
    ]
    parts += [dp.UploadDatasetRequest(labels=lab)]
    if draw(st.booleans()):
        parts = draw(st.permutations(parts))
    return parts


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    """.npz-like bytes: the exported model mutated (truncated, bytes flipped, junk appended),
    archives of random arrays with a random or deeply nested spec, random zips and bytes."""
    kind = draw(st.sampled_from(["mutated", "arrays", "zip", "bytes"]))
    if kind == "mutated":
        data = bytearray(WORLD["exported"])
        for _ in range(draw(st.integers(0, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
        return bytes(data) + (draw(st.binary(max_size=64)) if draw(st.booleans()) else b"")
    if kind == "arrays":
        arrays: dict[str, np.ndarray] = {}
        spec = draw(st.one_of(
            st.just(json.dumps(SMALL_SPEC)),
            st.text(TEXT, max_size=50),
            st.builds(lambda n: "[" * n + "]" * n, st.integers(1, 50_000)),
            st.builds(lambda s: json.dumps({"input_shape": [1, 8, 8], "layers": s}),
                      st.lists(st.fixed_dictionaries({"type": st.sampled_from(
                          ["flatten", "linear", "conv2d", "relu", "nope"])},
                          optional={"out_features": ints(64)}), max_size=4)),
        ))  # fmt: skip
        arrays["__spec__"] = np.array(spec)
        names = st.one_of(st.sampled_from(["0.weight", "0.bias", "4.weight", "4.bias"]),
                          st.text("abcxyz0123456789._", min_size=1, max_size=12))  # fmt: skip
        for name in draw(st.lists(names, max_size=4, unique=True)):
            dtype = draw(st.sampled_from(["<f4", "<f8", "<i8", "u1", "<c8", "?", "<U3", "V4"]))
            shape = draw(st.lists(st.integers(0, 5), max_size=3))
            n = math.prod(shape) * np.dtype(dtype).itemsize
            raw = draw(st.binary(min_size=n, max_size=n))
            arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
        return _npz(arrays)
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=draw(st.sampled_from(
                [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))) as z:  # fmt: skip
            for name in draw(
                st.lists(
                    st.sampled_from(["__spec__.npy", "0.weight.npy", "x", "a/b.npy", "../c.npy"]),
                    max_size=3,
                    unique=True,
                )
            ):
                z.writestr(name, draw(st.binary(max_size=300)))  # fmt: skip
        return buf.getvalue()
    return draw(st.binary(max_size=1024))


@st.composite
def imports(draw: st.DrawFn) -> list[mp.ImportModelRequest]:
    """A header (name and announced size right, absurd or random), then an archive in chunks."""
    intact = draw(st.integers(0, 9)) == 0  # now and then the export itself, as it is
    data = WORLD["exported"] if intact else draw(archives())
    size = len(data) if intact else draw(st.one_of(st.just(len(data)), st.just(0), ints(64)))
    name = draw(NAME if draw(st.booleans()) else keys())
    header = mp.ImportModelHeader(name=name, size_bytes=size)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    bounds = [0, *cuts, len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    return [mp.ImportModelRequest(header=header)] + [mp.ImportModelRequest(chunk=c) for c in chunks]


def existing(*names: str) -> st.SearchStrategy[str]:
    """A name of a fixture, or its id (known once the fixture has run)."""
    return st.deferred(lambda: st.sampled_from([k for n in names for k in (n, WORLD["ids"][n])]))


NAME = st.from_regex(r"[a-z][a-z0-9._-]{0,15}", fullmatch=True)
PAGE = st.integers(0, 3)


def plausible_templates() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Per request type, (always set, maybe set) fields holding values that mostly pass
    validation, so fuzzing reaches the code behind it: the handlers, the store, the engine."""
    job = st.deferred(lambda: st.sampled_from(WORLD["jobs"]))
    model, data = existing("m", "u"), existing("d", "d8")
    return {
        "cnnd.v1.CreateModelRequest": ({"name": NAME, "spec": specs()}, {"seed": PAGE}),
        "cnnd.v1.GetModelRequest": ({"model_id": model}, {}),
        "cnnd.v1.ListModelsRequest": ({}, {"page_size": PAGE}),
        "cnnd.v1.ExportModelRequest": ({"model_id": model}, {"version": st.integers(-1, 2)}),
        "cnnd.v1.GetDatasetRequest": ({"dataset_id": data}, {}),
        "cnnd.v1.ListDatasetsRequest": ({}, {"page_size": PAGE}),
        "cnnd.v1.TrainRequest": (
            {"model_id": model, "dataset_id": data, "epochs": st.integers(1, 3),
             "batch_size": st.integers(1, 70)},
            {"sgd": messages(jp.Sgd.DESCRIPTOR, small=True),
             "adam": messages(jp.Adam.DESCRIPTOR, small=True),
             "adamw": messages(jp.AdamW.DESCRIPTOR, small=True),
             "schedule": messages(jp.LrSchedule.DESCRIPTOR, small=True),
             "validation_fraction": st.floats(0.01, 0.99), "validation_dataset_id": data,
             "seed": PAGE, "checkpoint_every": PAGE, "early_stopping_patience": PAGE,
             "initial_version": st.integers(0, 2)},
        ),
        "cnnd.v1.GetJobRequest": ({"job_id": job}, {}),
        "cnnd.v1.ListJobsRequest": ({}, {"page_size": PAGE, "model_id": model,
                                         "state": st.integers(0, 6)}),
        "cnnd.v1.CancelJobRequest": ({"job_id": job}, {}),
        "cnnd.v1.WatchJobRequest": ({"job_id": job}, {}),
        "cnnd.v1.InferRequest": (
            {"model_id": existing("m"), "input": tensors()},
            {"version": st.sampled_from([0, 0, 1, 2]), "request_id": st.text(TEXT, max_size=8)},
        ),
        "cnnd.v1.InspectRequest": (
            {"model_id": model},
            {"version": st.integers(0, 2), "include_weights": st.booleans(), "input": tensors(),
             "target_class": st.integers(-1, 11)},
        ),
    }  # fmt: skip


TEMPLATES = plausible_templates()


def plausible(d: Descriptor, protect: bool) -> st.SearchStrategy[Any] | None:
    """Requests of type ``d`` from its template, each field swapped for an arbitrary value
    one time in four."""
    if d.full_name not in TEMPLATES:
        return None
    required, optional = TEMPLATES[d.full_name]
    fields = d.fields_by_name

    def mix(name: str, good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        bad = field_strategy(fields[name], False, protect)
        return st.integers(0, 3).flatmap(lambda roll: good if roll else bad)

    return st.fixed_dictionaries(
        {k: mix(k, v) for k, v in required.items()},
        optional={k: mix(k, v) for k, v in optional.items()},
    ).map(lambda kw: d._concrete_class(**kw))


def request_strategy(method: MethodDescriptor) -> st.SearchStrategy[Any]:
    """One request, or a list of them for a client stream: arbitrary, or plausible."""
    protect = method.name.startswith("Delete")  # the shared fixtures are not deleted
    one = messages(method.input_type, protect=protect)
    near = plausible(method.input_type, protect)
    if method.name == "InferStream":
        near = plausible(ip.InferRequest.DESCRIPTOR, protect)
        assert near is not None
        near = near.map(lambda r: ip.InferStreamRequest(request=r))
    if near is not None:
        one = st.one_of(one, near)
    if not method.client_streaming:
        return one
    special = {"UploadDataset": coherent_uploads(), "ImportModel": imports()}.get(method.name)
    random_stream = st.lists(one, max_size=6)
    return random_stream if special is None else st.one_of(random_stream, special)


# --- the live server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(
    tmp_path_factory: pytest.TempPathFactory, digits: tuple[np.ndarray, np.ndarray]
) -> Iterator[ServerProcess]:
    """One `cnnd serve` with small limits beside a trained model "m", an untrained "u", a
    float32 dataset "d", a uint8 "d8", a finished job, and throwaway things to delete."""
    root = tmp_path_factory.mktemp("fuzz")
    server = ServerProcess(
        root / "data", "--max-dataset-bytes", str(1 << 20), "--max-parameters", "2000000",
        "--max-queued-jobs", "3", "--max-infer-batch", "64",
    )  # fmt: skip
    try:
        server.wait_ready(180)
        with server.client(timeout=60) as c:
            x, y = digits
            m = c.create_model(SMALL_SPEC, name="m", seed=1)
            u = c.create_model(SMALL_SPEC, name="u")
            d = c.upload_dataset(x[:64], y[:64], name="d", num_classes=10)
            d8 = c.upload_dataset((x[:32] * 255).astype(np.uint8), y[:32], name="d8")
            job = c.train("m", "d", epochs=1, batch_size=16)
            assert job.wait(progress=False, timeout=120).state == "SUCCEEDED"
            victims = [c.create_model(SMALL_SPEC, name=f"victim{i}").id for i in range(3)]
            victims += [c.upload_dataset(x[:4], y[:4], name=f"victim-ds{i}", num_classes=10).id
                        for i in range(2)]  # fmt: skip
            WORLD["exported"] = b"".join(r.chunk for r in c.stub.ExportModel(
                mp.ExportModelRequest(model_id="m")))  # fmt: skip
        WORLD["keys"] = ["m", "u", "d", "d8", m.id, u.id, d.id, d8.id, job.id]
        WORLD["ids"] = {"m": m.id, "u": u.id, "d": d.id, "d8": d8.id}
        WORLD["jobs"] = [job.id, "job_0123456789abcdef"]
        WORLD["victims"] = [*victims, "victim0", "victim-ds1", "m-not-there"]
        WORLD["channel"] = grpc.insecure_channel(server.target)
        yield server
    finally:
        if "channel" in WORLD:
            WORLD.pop("channel").close()
        server.close()


def _invoke(method: MethodDescriptor, request: Any) -> tuple[grpc.StatusCode, list[int]]:
    """Call ``method`` on the live server; (final status, statuses reported in the stream)."""
    channel: grpc.Channel = WORLD["channel"]
    path = f"/{SERVICE.full_name}/{method.name}"
    kw = {"request_serializer": lambda m: m.SerializeToString(),
          "response_deserializer": method.output_type._concrete_class.FromString}  # fmt: skip
    in_stream: list[int] = []
    try:
        if method.client_streaming and method.server_streaming:
            for reply in channel.stream_stream(path, **kw)(iter(request), timeout=60):
                in_stream.append(reply.error.code)
        elif method.client_streaming:
            channel.stream_unary(path, **kw)(iter(request), timeout=60)
        elif method.server_streaming:
            call = channel.unary_stream(path, **kw)(request, timeout=WATCH_SECONDS)
            for _ in call:
                in_stream.append(0)
                if method.name == "WatchJob" and len(in_stream) >= 3:
                    call.cancel()  # a running job streams until it ends; 3 events prove it works
                    break
        else:
            reply = channel.unary_unary(path, **kw)(request, timeout=60)
            if method.name == "Train":  # do not let fuzzed jobs hog the CPU
                cancel = channel.unary_unary(
                    f"/{SERVICE.full_name}/CancelJob",
                    request_serializer=jp.CancelJobRequest.SerializeToString,
                    response_deserializer=jp.CancelJobResponse.FromString,
                )
                try:
                    cancel(jp.CancelJobRequest(job_id=reply.job.id), timeout=30)
                except grpc.RpcError as e:
                    assert e.code() == C.FAILED_PRECONDITION, e  # it already ended
    except grpc.RpcError as e:
        # A watch of a job that waits in the queue sends its snapshot, then nothing for a while.
        waiting = e.code() == C.DEADLINE_EXCEEDED and method.name == "WatchJob" and in_stream
        return (C.OK if waiting else e.code()), in_stream
    return C.OK, in_stream


def check(method: MethodDescriptor, request: Any) -> None:
    """The call ends with a documented status, and so does every in-stream answer."""
    code, in_stream = _invoke(method, request)
    TALLY.setdefault(method.name, Counter())[code.name] += 1
    assert code in DOCUMENTED, f"{method.name} answered {code.name} to {request!r}"[:2000]
    assert set(in_stream) <= DOCUMENTED_VALUES, f"{method.name} in-stream {in_stream}"


# --- regressions found by fuzzing (each was INTERNAL before its fix) -------------------------


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def _broken_deflate() -> bytes:
    """A .npz whose one member's deflate stream starts with an invalid block type."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("__spec__.npy", _spec_npy(json.dumps(SMALL_SPEC)))
    data = bytearray(buf.getvalue())
    data[30 + len("__spec__.npy")] = 0b111  # BFINAL=1, BTYPE=11 (reserved)
    return bytes(data)


def _import(data: bytes) -> list[mp.ImportModelRequest]:
    header = mp.ImportModelHeader(name="regression", size_bytes=len(data))
    return [mp.ImportModelRequest(header=header), mp.ImportModelRequest(chunk=data)]


def _spec_npy(text: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array(text))
    return buf.getvalue()


# fmt: off
REGRESSIONS: dict[str, list[Any]] = {
    "ImportModel": [
        # A member that is not a .npy came back from np.load as bytes: AttributeError.
        _import(_zip({"__spec__.npy": b"\x80\x04K\x01.", "0.weight.npy": b"junk"})),
        # A .npy header announcing 4 TiB: MemoryError before a byte was read.
        _import(_zip({"__spec__.npy": _spec_npy(json.dumps(SMALL_SPEC)),
                      "0.weight.npy": _npy_header((2**40,)) + b"\0" * 16})),
        # A spec nested 100 000 deep: RecursionError in json.loads.
        _import(_npz({"__spec__": np.array("[" * 100_000 + "]" * 100_000)})),
        # A corrupt deflate stream: zlib.error escaped load_npz.
        _import(_broken_deflate()),
    ],
}
# fmt: on


def _make_test(method: MethodDescriptor) -> Callable[..., None]:
    @FUZZ
    @given(call=request_strategy(method))
    def test(fuzz_server: ServerProcess, call: Any) -> None:
        check(method, call)

    for regression in REGRESSIONS.get(method.name, []):
        test = example(call=regression)(test)
    test.__name__ = f"test_fuzz_{method.name}"
    test.__doc__ = (f"Hypothesis-made {method.name} requests get only documented statuses "
                    "from the live server.")  # fmt: skip
    return test


for _method in SERVICE.methods:
    globals()[f"test_fuzz_{_method.name}"] = _make_test(_method)


def test_every_rpc_is_fuzzed() -> None:
    """The descriptor walk covers all 19 RPCs (a new RPC gets a fuzz test by itself)."""
    names = {m.name for m in SERVICE.methods}
    assert len(names) == 19
    assert {n for n in names if callable(globals().get(f"test_fuzz_{n}"))} == names


@FUZZ
@given(spec=specs(), seed=st.integers(0, 2**63 - 1), weights=st.booleans())
def test_fuzz_random_models_build_run_and_round_trip(
    fuzz_server: ServerProcess, spec: mp.ModelSpec, seed: int, weights: bool
) -> None:
    """Any spec CreateModel accepts can be inspected with an input (forward, feature maps,
    saliency), exported and imported back: the engine never fails on a spec validation let
    through."""
    channel: grpc.Channel = WORLD["channel"]
    create = channel.unary_unary(
        f"/{SERVICE.full_name}/CreateModel", request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=mp.CreateModelResponse.FromString,
    )  # fmt: skip
    name = f"rnd-{seed:x}"
    try:
        model = create(mp.CreateModelRequest(name=name, spec=spec, seed=seed), timeout=60).model
    except grpc.RpcError as e:
        TALLY.setdefault("random models", Counter())[e.code().name] += 1
        assert e.code() in (C.INVALID_ARGUMENT, C.ALREADY_EXISTS), (e.code(), e.details(), spec)
        return
    TALLY.setdefault("random models", Counter())["created"] += 1
    shape = [1, *model.spec.input_shape]
    if math.prod(shape) <= 1 << 16:
        x = np.random.default_rng(seed % 2**32).standard_normal(shape).astype(np.float32)
        request = {"model_id": model.id, "include_weights": weights,
                   "input": tp.Tensor(shape=shape, dtype=F32, data=x.tobytes())}  # fmt: skip
    else:
        request = {"model_id": model.id, "include_weights": weights}
    for method, req in (("Inspect", ip.InspectRequest(**request)),
                        ("ExportModel", mp.ExportModelRequest(model_id=model.id))):  # fmt: skip
        code, _ = _invoke(SERVICE.methods_by_name[method], req)
        assert code == C.OK, (method, code, spec)
    code, _ = _invoke(SERVICE.methods_by_name["DeleteModel"], mp.DeleteModelRequest(model_id=name))
    assert code == C.OK


def test_undecodable_bytes_are_not_internal(fuzz_server: ServerProcess) -> None:
    """Bytes that are not a protobuf message at all, sent to every RPC, get a documented
    status: INVALID_ARGUMENT from server/rpc.py's DecodeGuard, where gRPC alone would answer
    INTERNAL ("Exception deserializing request!") before any cnnd code runs."""
    channel: grpc.Channel = WORLD["channel"]
    wrong: dict[str, tuple[str, str]] = {}
    for method in SERVICE.methods:
        path = f"/{SERVICE.full_name}/{method.name}"
        kw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
        garbage = b"\x0a\xff\xff\xff\xff\x0f"  # a field 1 of length 2^32-1: truncated
        try:
            if method.client_streaming and method.server_streaming:
                list(channel.stream_stream(path, **kw)(iter([garbage]), timeout=30))
            elif method.client_streaming:
                channel.stream_unary(path, **kw)(iter([garbage]), timeout=30)
            elif method.server_streaming:
                list(channel.unary_stream(path, **kw)(garbage, timeout=30))
            else:
                channel.unary_unary(path, **kw)(garbage, timeout=30)
        except grpc.RpcError as e:
            if e.code() not in DOCUMENTED:
                wrong[method.name] = (e.code().name, e.details())
    assert wrong == {}


def test_fuzzed_server_still_serves(fuzz_server: ServerProcess, tmp_path: Path) -> None:
    """After the fuzzing the server process is alive, health says SERVING, a new model trains
    and infers, and its log holds no internal error."""
    assert fuzz_server.proc.poll() is None, "the server died"
    channel: grpc.Channel = WORLD["channel"]
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with fuzz_server.client(timeout=60) as c:
        c.create_model(SMALL_SPEC, name="after-fuzz")
        job = c.train("after-fuzz", "d", epochs=1, batch_size=16)
        assert job.wait(progress=False, timeout=120).state == "SUCCEEDED"
        result = c.infer("after-fuzz", np.zeros((2, 1, 8, 8), np.float32))
        assert len(result.classes) == 2
    log = fuzz_server.logs()
    assert "internal error" not in log, log[log.find("internal error") - 500 :][:3000]
    print({name: dict(counts) for name, counts in sorted(TALLY.items())})
