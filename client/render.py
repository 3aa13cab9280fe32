"""Drawing an Inspection: first-layer kernels, a sample's feature maps and its saliency map.

Needs matplotlib (``pip install cnnd[plot]``); uses the Agg backend, so no display is needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cnnd.client._types import Inspection


def render_inspection(ins: Inspection, path: str | Path, x: np.ndarray | None = None) -> Path:
    """Draw ``ins`` to the PNG ``path`` (returned): the input ``x`` ((C, H, W) or
    (1, C, H, W)) when given, the first conv layer's kernels (include_weights=True), its
    feature maps and the saliency map (an Inspection made with an input)."""
    if x is not None:
        x = np.asarray(x)
        x = x[None] if x.ndim == 3 else x
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("rendering needs matplotlib: pip install matplotlib") from e
    first = next((l for l in ins.layers if l.type == "conv2d"), None)
    kernels = ins.weights.get(f"{first.index}.weight") if first is not None else None
    maps = ins.feature_maps.get(f"{first.index}.conv2d") if first is not None else None
    panels = [p for p in (kernels, maps, ins.saliency) if p is not None]
    rows = max(len(panels), 1) + (x is not None)
    fig = plt.figure(figsize=(10, 2.6 * rows), constrained_layout=True)
    sub = fig.subfigures(rows, 1, squeeze=False)[:, 0]
    i = 0
    if x is not None:
        _grid(sub[i], np.asarray(x)[0], "input", cmap="gray")
        i += 1
    if kernels is not None:
        _grid(sub[i], kernels[:, 0], f"layer {first.index} kernels (input channel 0)", "bwr")  # type: ignore[union-attr]
        i += 1
    if maps is not None:
        _grid(sub[i], maps[0], f"layer {first.index} feature maps", "viridis")  # type: ignore[union-attr]
        i += 1
    if ins.saliency is not None:
        sal = np.abs(ins.saliency[0]).max(axis=0)
        _grid(sub[i], sal[None], f"saliency |dL/dx| for class {ins.target_class}", "hot")
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _grid(fig, planes: np.ndarray, title: str, cmap: str) -> None:  # type: ignore[no-untyped-def]
    n = min(len(planes), 32)
    cols = min(n, 16)
    rows = math.ceil(n / cols)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.suptitle(title, fontsize=10)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k < n:
            ax.imshow(planes[k], cmap=cmap, interpolation="nearest")
