"""Serialization without pickle: specs as JSON, arrays as .npz read with allow_pickle=False.

An exported model is one .npz holding the PyTorch state_dict names ("0.weight", ...) and the
spec as a JSON string under ``__spec__``, so::

    arrays = np.load("model.npz")
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()
                                 if k != "__spec__"})

Writes are atomic: a temporary file in the same directory, fsync, then rename, so a reader (or
a restart after a crash) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from cnnd.core.model import Sequential
from cnnd.core.spec import DEFAULT_LIMITS, SpecLimits

SPEC_KEY = "__spec__"
MAX_ARRAYS = 100_000


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    midway: Callable[[], None] | None = None,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """Write ``data`` to ``path`` so that the file is either absent/old or complete.

    ``midway`` and ``before_rename`` run with half the bytes written, and with all of them
    synced but not yet renamed; crash tests kill the process there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if midway is not None:
                f.flush()
                midway()
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays as the bytes of an uncompressed .npz (no object arrays allowed)."""
    for name, a in arrays.items():
        if np.asarray(a).dtype.hasobject:
            raise ValueError(f"array {name!r} has an object dtype, which .npz cannot hold safely")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_npz(source: str | os.PathLike[str] | bytes | IO[bytes]) -> dict[str, np.ndarray]:
    """Read every array of a .npz with allow_pickle=False; object arrays raise ValueError."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        loaded = np.load(source, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a single .npy array, not an archive
            raise ValueError("not a .npz archive: it holds one unnamed array (.npy)")
        with loaded as npz:
            if len(npz.files) > MAX_ARRAYS:
                raise ValueError(f"the archive holds {len(npz.files)} arrays; at most {MAX_ARRAYS}")
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"not a readable .npz archive: {e}") from e
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise ValueError("the archive holds object arrays (pickled data); refused") from e
        raise


def model_arrays(model: Sequential) -> dict[str, np.ndarray]:
    """The model's state_dict plus its spec as JSON under ``__spec__``."""
    return {SPEC_KEY: np.array(json.dumps(model.spec)), **model.state_dict()}


def model_from_arrays(
    arrays: dict[str, np.ndarray], limits: SpecLimits = DEFAULT_LIMITS
) -> Sequential:
    """Rebuild a model from ``model_arrays`` output; the spec is validated like any other."""
    if SPEC_KEY not in arrays:
        raise ValueError(f"the archive has no {SPEC_KEY!r} entry holding the model's spec")
    raw = arrays[SPEC_KEY]
    if raw.dtype.kind != "U" or raw.shape != ():
        raise ValueError(f"{SPEC_KEY!r} must be a JSON string")
    try:
        spec: Any = json.loads(str(raw))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{SPEC_KEY!r} is not valid JSON: {e}") from e
    model = Sequential.from_spec(spec, seed=0, limits=limits)
    model.load_state_dict({k: v for k, v in arrays.items() if k != SPEC_KEY})
    return model


def save_model(path: str | os.PathLike[str], model: Sequential) -> None:
    """Write the model (spec and weights) to a .npz, atomically."""
    atomic_write(path, npz_bytes(model_arrays(model)))


def load_model(
    path: str | os.PathLike[str] | bytes, limits: SpecLimits = DEFAULT_LIMITS
) -> Sequential:
    """Read a model written by ``save_model`` (or exported by the service)."""
    return model_from_arrays(load_npz(path), limits)
