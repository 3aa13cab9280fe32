"""Scratch arrays kept by a layer and reused across calls, so the hot loops do not allocate.

Each thread gets its own arrays (a model may be called from several threads at once, e.g.
inference beside a training job's evaluation), and an array is replaced only when the shape
it must have changes (a different batch size).
"""

from __future__ import annotations

import threading

import numpy as np


class Workspace(threading.local):
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.kept: object = None  # what the arrays hold for a later call (see conv2d_forward)
        self.children: dict[str, Workspace] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype``, the same one as last time when
        those match."""
        a = self.arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self.arrays[name] = np.empty(shape, dtype=dtype)
        return a

    def child(self, name: str) -> Workspace:
        """A workspace of its own for a second use of the same kernel (e.g. the Winograd path
        run for dL/dx beside the forward one), so the two do not resize each other's arrays."""
        ws = self.children.get(name)
        if ws is None:
            ws = self.children[name] = Workspace()
        return ws

    def clear(self) -> None:
        self.arrays.clear()
        self.children.clear()
        self.kept = None

    def __deepcopy__(self, memo: dict[int, object]) -> Workspace:
        return Workspace()  # scratch: a copy starts empty
