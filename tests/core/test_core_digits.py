"""Real data: scikit-learn's 8x8 digits (1,797 images, bundled with sklearn, no download)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from cnnd.core import SGD, Schedule, Sequential, evaluate, fit, predict

sklearn_datasets = pytest.importorskip("sklearn.datasets")
model_selection = pytest.importorskip("sklearn.model_selection")

TIME_LIMIT = 60.0  # seconds, on 2 cores, once the kernels are compiled


@pytest.mark.slow
def test_digits_cnn_reaches_97_percent_within_a_minute(
    digits_spec: dict[str, Any], jit_warm: None
) -> None:
    """A small CNN trained with cnnd.core.fit reaches >= 97% accuracy on a held-out stratified
    20% of the digits; loading, splitting, training and evaluating take under 60 s."""
    t0 = time.perf_counter()
    digits = sklearn_datasets.load_digits()
    x = (digits.images / 16).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    y = digits.target
    assert x.shape == (1797, 1, 8, 8) and x.max() == 1.0
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    model = Sequential.from_spec(digits_spec, seed=0)
    result = fit(
        model, x_train, y_train, epochs=30, batch_size=32,
        optimizer=SGD(lr=0.05, momentum=0.9, weight_decay=1e-4), schedule=Schedule("cosine"),
        seed=0,
    )  # fmt: skip
    loss, accuracy = evaluate(model, x_test, y_test)
    elapsed = time.perf_counter() - t0

    assert result.completed and len(result.history) == 30
    assert result.history[-1].loss < 0.1 * result.history[0].loss
    assert len(x_test) == 360 and np.bincount(y_test).min() >= 35
    assert accuracy >= 0.97, f"test accuracy {accuracy:.4f}"
    assert loss < 0.15
    assert (predict(model, x_test).argmax(axis=1) == y_test).mean() == accuracy
    assert elapsed < TIME_LIMIT, f"took {elapsed:.1f} s"
