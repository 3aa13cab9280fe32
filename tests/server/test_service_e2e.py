"""The service end to end over a real channel: create -> upload -> train -> watch -> infer ->
inspect -> export -> import, a restart that keeps everything, and a SIGKILL mid-training that
resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnd.client import Client, FailedPrecondition
from cnnd.core import load_model
from tests.conftest import SMALL_SPEC, wait_for

pytestmark = pytest.mark.slow

SLOW_SPEC = {  # enough work per epoch that a test can stop the server in the middle of one
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.2},
        {"type": "linear", "out_features": 10},
    ],
}
TRAIN = dict(epochs=6, batch_size=4, optimizer="sgd", lr=0.02, momentum=0.9, seed=7,
             validation=0.2)  # fmt: skip


def test_end_to_end(client: Client, digits: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    x, y = digits
    model = client.create_model(SMALL_SPEC, name="digits-small", seed=3)
    assert model.parameter_count == 4 * (9 + 1) + 10 * (4 * 4 * 4 + 1)
    assert model.latest_version == 0
    with pytest.raises(FailedPrecondition, match="no trained version"):
        client.infer(model, x[:2])

    data = client.upload_dataset(x, y, name="digits")
    assert (data.sample_count, data.sample_shape, data.dtype) == (len(x), (1, 8, 8), "float32")
    job = client.train(model, data, epochs=4, batch_size=32, optimizer="adam", lr=0.01,
                       validation=0.2, seed=1)  # fmt: skip
    assert job.state in ("QUEUED", "RUNNING")

    events = list(job.events())
    kinds = [e.kind for e in events]
    assert kinds[0] == "snapshot"
    # A watcher that joins late sees the finished epochs in the snapshot, the rest live.
    assert len(events[0].job.history) + kinds.count("epoch") == 4
    assert events[-1].job.state == "SUCCEEDED"
    final = client.get_job(job.id)
    assert final.state == "SUCCEEDED" and final.result_version == 1
    assert len(final.history) == 4 and final.history[-1].val_accuracy is not None
    assert final.history[-1].val_accuracy > 0.85

    model = client.get_model("digits-small")
    assert model.latest_version == 1 and model.versions[0].job_id == job.id
    assert len(model.versions[0].history) == 4

    result = client.infer(model, x[:64])
    assert result.logits.shape == (64, 10) and result.version == 1
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1, rtol=1e-5)
    assert np.array_equal(result.classes, result.logits.argmax(axis=1))
    assert np.mean(result.classes == y[:64]) > 0.8

    ins = client.inspect(model, input=x[0], include_weights=True)
    assert [l.type for l in ins.layers] == [l["type"] for l in SMALL_SPEC["layers"]]
    assert ins.layers[0].receptive_field == (3, 3)
    assert {p.name for p in ins.parameters} == {"0.weight", "0.bias", "4.weight", "4.bias"}
    assert ins.weights["0.weight"].shape == (4, 1, 3, 3)
    assert ins.feature_maps["0.conv2d"].shape == (1, 4, 8, 8)
    assert ins.saliency is not None and ins.saliency.shape == (1, 1, 8, 8)
    assert ins.target_class == int(result.classes[0])
    assert ins.history[1][-1].epoch == 4

    path = client.export_model(model, tmp_path / "model.npz")
    local = load_model(path)
    np.testing.assert_allclose(local.forward(x[:64]), result.logits, rtol=1e-5, atol=1e-6)
    imported = client.import_model(path, name="digits-copy")
    assert imported.latest_version == 1 and imported.versions[0].source == "import"
    again = client.infer(imported, x[:64])
    np.testing.assert_array_equal(again.logits, result.logits)

    assert [m.name for m in client.list_models()] == ["digits-small", "digits-copy"]
    assert [j.id for j in client.list_jobs()] == [job.id]


def test_restart_keeps_everything(spawn, digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    data_dir = tmp_path / "data"
    first = spawn(data_dir)
    first.wait_ready()
    with first.client() as c:
        model = c.create_model(SMALL_SPEC, name="m", seed=1)
        data = c.upload_dataset(x, y, name="d")
        job = c.train(model, data, epochs=2, batch_size=64, lr=0.1).wait(progress=False)
        assert job.state == "SUCCEEDED"
        before = c.infer(model, x[:32])
    assert first.terminate() == 0

    second = spawn(data_dir)
    second.wait_ready()
    with second.client() as c:
        assert [m.name for m in c.list_models()] == ["m"]
        assert [d.name for d in c.list_datasets()] == ["d"]
        assert c.get_job(job.id).state == "SUCCEEDED"
        assert c.get_model("m").versions[0].history == job.history
        after = c.infer("m", x[:32])
    np.testing.assert_array_equal(after.logits, before.logits)


def _weights(c: Client, model: str, path: Path) -> dict[str, np.ndarray]:
    return load_model(c.export_model(model, path)).state_dict()


def test_sigkill_mid_training_resumes_to_the_same_weights(spawn, digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    # The reference: the same job, uninterrupted.
    ref = spawn(tmp_path / "ref")
    ref.wait_ready()
    with ref.client() as c:
        m = c.create_model(SLOW_SPEC, name="m", seed=5)
        d = c.upload_dataset(x, y, name="d")
        assert c.train(m, d, **TRAIN).wait(progress=False).state == "SUCCEEDED"
        expected = _weights(c, "m", tmp_path / "ref.npz")
    ref.terminate()

    victim = spawn(tmp_path / "victim")
    victim.wait_ready()
    with victim.client() as c:
        m = c.create_model(SLOW_SPEC, name="m", seed=5)
        d = c.upload_dataset(x, y, name="d")
        job = c.train(m, d, **TRAIN)
        # Kill it in the middle of epoch 3, after two checkpoints.
        wait_for(lambda: (p := c.get_job(job.id).progress).epoch >= 3 and p.step > 10,
                 timeout=120, interval=0.02, what="epoch 3")  # fmt: skip
    victim.kill()

    revived = spawn(tmp_path / "victim")
    revived.wait_ready()
    with revived.client() as c:
        final = c.wait_job(job.id, progress=False, timeout=300)
        assert final.state == "SUCCEEDED", final.failure_reason
        assert final.attempts == 2
        assert [e.epoch for e in final.history] == list(range(1, 7))
        got = _weights(c, "m", tmp_path / "victim.npz")
    assert "resumes at epoch 3" in revived.logs()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
