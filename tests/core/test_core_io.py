"""Serialization without pickle: save_model/load_model, load_npz, model_from_arrays."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnd.core import (
    SGD,
    Sequential,
    SpecError,
    fit,
    load_model,
    load_npz,
    model_arrays,
    model_from_arrays,
    save_model,
)
from cnnd.core.io import npz_bytes

SPEC: dict[str, Any] = {
    "input_shape": [2, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 4, "kernel_size": [3, 2], "stride": [1, 2],
         "padding": 1},
        {"type": "batchnorm2d", "momentum": 0.2},
        {"type": "relu"},
        {"type": "avgpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.1},
        {"type": "linear", "out_features": 3},
    ],
}  # fmt: skip


class Payload:
    """Unpickling this object calls open(path, "w"): creating the file proves code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.path), "w")


def pickled_npz(marker: Path, with_spec: bool = False) -> bytes:
    """An .npz whose array is an object array holding a Payload (numpy pickles it)."""
    arrays: dict[str, Any] = {"0.weight": np.array([Payload(marker)], dtype=object)}
    if with_spec:
        arrays["__spec__"] = np.array(json.dumps(SPEC))
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # numpy itself pickles object arrays
    return buf.getvalue()


@pytest.fixture
def trained(rng: np.random.Generator) -> Sequential:
    """A model whose weights and batchnorm buffers have moved away from initialisation."""
    model = Sequential.from_spec(SPEC, seed=3)
    x = rng.standard_normal((24, 2, 8, 8)).astype(np.float32)
    fit(model, x, rng.integers(0, 3, 24), epochs=2, batch_size=8, optimizer=SGD(lr=0.1))
    assert int(model.state_dict()["1.num_batches_tracked"]) == 6
    return model


def test_save_load_round_trip_is_exact(
    trained: Sequential, tmp_path: Path, rng: np.random.Generator
) -> None:
    """save_model/load_model restore the spec and every array bit for bit, dtypes included,
    from a path and from bytes; the loaded model predicts identically."""
    path = tmp_path / "sub" / "model.npz"
    save_model(path, trained)
    assert [p.name for p in path.parent.iterdir()] == ["model.npz"], "no temporary file left"
    for source in (path, path.read_bytes()):
        loaded = load_model(source)
        assert loaded.spec == trained.spec
        ours, theirs = trained.state_dict(), loaded.state_dict()
        assert list(ours) == list(theirs)
        for k, v in ours.items():
            assert theirs[k].dtype == v.dtype and theirs[k].shape == v.shape, k
            assert np.array_equal(theirs[k], v), k
        x = rng.standard_normal((5, 2, 8, 8)).astype(np.float32)
        np.testing.assert_array_equal(loaded.forward(x), trained.forward(x))


def test_saved_file_is_a_plain_npz_with_torch_names(trained: Sequential, tmp_path: Path) -> None:
    """The file is readable by np.load(allow_pickle=False): state_dict names plus the spec
    as a JSON string under __spec__."""
    path = tmp_path / "model.npz"
    save_model(path, trained)
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {"__spec__", *trained.state_dict()}
        assert json.loads(str(npz["__spec__"])) == trained.spec
    arrays = model_arrays(trained)
    assert model_from_arrays(arrays).spec == trained.spec


def test_overwrite_replaces_the_file(trained: Sequential, tmp_path: Path) -> None:
    """Saving over an existing file replaces it completely."""
    path = tmp_path / "model.npz"
    save_model(path, Sequential.from_spec(SPEC, seed=0))
    save_model(path, trained)
    np.testing.assert_array_equal(
        load_model(path).state_dict()["0.weight"], trained.state_dict()["0.weight"]
    )


def test_payload_is_live(tmp_path: Path) -> None:
    """Control for the next test: numpy's own pickle loading would run the payload."""
    marker = tmp_path / "control-marker"
    with np.load(io.BytesIO(pickled_npz(marker)), allow_pickle=True) as npz:
        npz["0.weight"]
    assert marker.exists()


@pytest.mark.parametrize("with_spec", [False, True])
def test_object_arrays_are_refused_and_never_unpickled(tmp_path: Path, with_spec: bool) -> None:
    """A .npz holding a pickled object array is refused with ValueError by load_npz and
    load_model, from bytes and from a path, and the payload's side effect never happens."""
    marker = tmp_path / "pwned"
    data = pickled_npz(marker, with_spec)
    path = tmp_path / "evil.npz"
    path.write_bytes(data)
    for source in (data, path, io.BytesIO(data)):
        with pytest.raises(ValueError, match="object arrays"):
            load_npz(source)
        assert not marker.exists()
    for source in (data, path):
        with pytest.raises(ValueError, match="object arrays"):
            load_model(source)
        assert not marker.exists()


def test_raw_pickle_file_is_refused(tmp_path: Path) -> None:
    """A bare pickle (not an .npz) with a payload is refused and does not run."""
    marker = tmp_path / "pwned"
    path = tmp_path / "model.npz"
    path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError):
        load_model(path)
    assert not marker.exists()


def test_object_arrays_cannot_be_written() -> None:
    """npz_bytes refuses object arrays instead of pickling them."""
    with pytest.raises(ValueError, match="object dtype"):
        npz_bytes({"a": np.array([{"x": 1}], dtype=object)})


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (b"not a zip file", "pickled data"),  # np.load takes unknown bytes for a pickle
        (b"PK\x03\x04truncated", "not a readable .npz"),
        (b"", "not a readable .npz"),
        (_npy(np.arange(3)), "not a .npz archive"),
    ],
    ids=["text", "truncated-zip", "empty", "npy"],
)
def test_garbage_is_refused(data: bytes, pattern: str) -> None:
    """Bytes that are not an .npz (including a bare .npy) give ValueError, never a
    zipfile/OSError/TypeError, from load_npz and load_model."""
    with pytest.raises(ValueError, match=pattern):
        load_npz(data)
    with pytest.raises(ValueError, match=pattern):
        load_model(data)


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_model_archives_are_validated(trained: Sequential) -> None:
    """A missing, non-string or invalid spec, a spec that fails validation, and weights that
    do not match the spec are all refused with ValueError."""
    state = trained.state_dict()
    with pytest.raises(ValueError, match="no '__spec__' entry"):
        load_model(_npz(**state))
    with pytest.raises(ValueError, match="must be a JSON string"):
        load_model(_npz(__spec__=np.array([1, 2]), **state))
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_model(_npz(__spec__=np.array("{nope"), **state))
    bad_spec = {**SPEC, "layers": [{"type": "conv2d", "out_channels": 2**31, "kernel_size": 1}]}
    with pytest.raises(SpecError, match="exceeds the limit"):
        load_model(_npz(__spec__=np.array(json.dumps(bad_spec)), **state))
    spec = np.array(json.dumps(trained.spec))
    with pytest.raises(ValueError, match="missing"):
        load_model(_npz(__spec__=spec, **{k: v for k, v in state.items() if k != "6.bias"}))
    nan = {**state, "6.bias": np.full(3, np.nan, np.float32)}
    with pytest.raises(ValueError, match="NaN"):
        load_model(_npz(__spec__=spec, **nan))
