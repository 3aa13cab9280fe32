"""Scale-out end to end: three `cnnd serve` replicas on one PostgreSQL.

Six jobs go in through different replicas; one replica is SIGKILLed in the middle of a job.
Everything must still succeed, the killed job resumed by a survivor from its checkpoint, with
weights equal to an uninterrupted single-node run; no job may have two runners at once; every
replica answers Infer identically; WatchJob works on replicas that do not train the job; and a
replica started afterwards sees everything.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from cnnd.client import Client, JobEvent
from cnnd.core import load_model
from tests.conftest import ServerProcess, wait_for

pytestmark = pytest.mark.slow
pytest_plugins = ["tests.pg"]

SPEC = {  # about a second per epoch on a busy 2-core machine: long enough to be watched
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 10},
    ],
}
JOBS = 6
EPOCHS = 8
LEASE = 3.0
TRAIN = dict(epochs=EPOCHS, batch_size=16, optimizer="sgd", lr=0.05, momentum=0.9,
             validation=0.2, checkpoint_every=1)  # fmt: skip
LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ cnnd\.jobs: job (job_\w+):? (.*)$"
)


def _weights(c: Client, model: str, path: Path) -> dict[str, np.ndarray]:
    return load_model(c.export_model(model, path)).state_dict()


def _submit(c: Client, i: int, dataset: str) -> str:
    """Job ``i``: its own model (seed i) and training seed, the same on every run."""
    return c.train(f"m{i}", dataset, seed=100 + i, **TRAIN).id


def _reference(client: Client, x: np.ndarray, y: np.ndarray, tmp: Path) -> list[dict[str, Any]]:
    """The six jobs on a single node (in-process, SQLite), one after another."""
    client.upload_dataset(x, y, name="digits")
    for i in range(JOBS):
        client.create_model(SPEC, name=f"m{i}", seed=i)
    for i in range(JOBS):
        job = client.wait_job(_submit(client, i, "digits"), progress=False, timeout=300)
        assert job.state == "SUCCEEDED", job.failure_reason
    return [_weights(client, f"m{i}", tmp / f"ref{i}.npz") for i in range(JOBS)]


class Watch(threading.Thread):
    """WatchJob on one replica, collecting every event until the stream ends."""

    def __init__(self, replica: ServerProcess, worker: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.replica, self.worker, self.job_id = replica, worker, job_id
        self.events: list[JobEvent] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.replica.client(timeout=30) as c:
                self.events.extend(c.watch_job(self.job_id))
        except BaseException as e:
            self.error = e

    def check(self, remote: bool) -> None:
        """Snapshot, then each epoch once and in order, ending SUCCEEDED. ``remote``: the
        replica never trained the job, so every event came from polling the store."""
        what = f"WatchJob of {self.job_id} on {self.worker} (remote={remote})"
        assert self.error is None, f"{what}: {self.error!r}"
        assert self.events and self.events[0].kind == "snapshot", what
        assert self.events[-1].job.state == "SUCCEEDED", what
        assert [e.epoch for e in self.events[-1].job.history] == list(range(1, EPOCHS + 1))
        if remote:
            seen = [e.epoch for e in self.events[0].job.history]
            seen += [e.epoch.epoch for e in self.events if e.kind == "epoch" and e.epoch]
            assert seen == list(range(1, EPOCHS + 1)), f"{what}: epochs {seen}"
            assert "RUNNING" in {e.job.state for e in self.events[:-1]}, what


def _log_intervals(logs: dict[str, str], killed: str, kill_time: float) -> dict[str, list]:
    """Per job, the (start, end, worker, attempt) of every run the server logs show: from
    "RUNNING (attempt n)" to its end line; a run of the killed replica ends at the kill."""
    runs: dict[str, list] = {}
    for worker, text in logs.items():
        open_runs: dict[str, tuple[float, int]] = {}
        for line in text.splitlines():
            m = LOG_LINE.match(line)
            if not m:
                continue
            t = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            job, rest = m[2], m[3]
            if attempt := re.match(r"RUNNING: attempt (\d+)", rest):
                open_runs[job] = (t, int(attempt[1]))
            elif job in open_runs and re.match(
                r"(SUCCEEDED|FAILED|CANCELLED|QUEUED|lease lost)", rest
            ):
                start, n = open_runs.pop(job)
                runs.setdefault(job, []).append((start, t, worker, n))
        for job, (start, n) in open_runs.items():
            assert worker == killed, f"{worker} never ended its run of {job}"
            runs.setdefault(job, []).append((start, kill_time, worker, n))
    return runs


def _leases(url: str) -> dict[str, list[tuple]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT job_id, attempt, worker, claimed_at, expires_at, ended_at FROM job_leases"
            " ORDER BY job_id, attempt"
        ).fetchall()
    out: dict[str, list[tuple]] = {}
    for r in rows:
        out.setdefault(r[0], []).append(r[1:])
    return out


def _mid_job(url: str) -> tuple[str, str] | None:
    """(job, worker) of a running job that has a checkpoint and an epoch still to go."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT j.id, j.lease_owner, j.progress FROM jobs j"
            " JOIN checkpoints c ON c.job_id = j.id WHERE j.state = 'RUNNING'"
        ).fetchall()
    for job_id, worker, progress in rows:
        p = json.loads(progress)
        if 2 <= p.get("epoch", 0) < EPOCHS:
            return str(job_id), str(worker)
    return None


def test_three_replicas_share_the_work_and_survive_a_sigkill(
    pg_url: str, spawn, client: Client, digits, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    expected = _reference(client, x, y, tmp_path)

    flags = ("--store", pg_url, "--lease-seconds", str(LEASE))
    names = ["r1", "r2", "r3"]
    reps = {n: spawn(tmp_path / n, *flags, "--worker-id", n) for n in names}
    for r in reps.values():
        r.wait_ready()
    cs = {n: r.client(timeout=60) for n, r in reps.items()}

    # Everything made on one replica is visible on the others at once.
    cs["r1"].upload_dataset(x, y, name="digits")
    for i in range(JOBS):
        cs[names[i % 3]].create_model(SPEC, name=f"m{i}", seed=i)
    jobs: list[str] = []
    watches: list[Watch] = []
    for i in range(JOBS):
        jobs.append(_submit(cs[names[(i + 1) % 3]], i, "digits"))
        watches += [Watch(reps[n], n, jobs[-1]) for n in names]
        for w in watches[-len(names) :]:
            w.start()

    # Kill a replica in the middle of a job, after the job checkpointed at least one epoch.
    victim, killed = wait_for(lambda: _mid_job(pg_url), timeout=180, interval=0.02,
                              what="a job in the middle of its epochs")  # fmt: skip
    reps[killed].kill()
    kill_time = time.time()
    cs.pop(killed).close()
    survivors = [n for n in names if n != killed]

    finals = {j: cs[survivors[0]].wait_job(j, progress=False, timeout=300) for j in jobs}
    for j, final in finals.items():
        assert final.state == "SUCCEEDED", (j, final.failure_reason)
        # Another job with 2 attempts lost its lease without a crash: the machine starved a
        # replica's heartbeat for longer than the lease.
        assert final.attempts == (2 if j == victim else 1), (j, final.attempts)
        assert [e.epoch for e in final.history] == list(range(1, EPOCHS + 1))

    # Exactly one runner at a time, by the database's own record of the leases (its clock):
    # a job is claimed again only after the previous lease ended or expired.
    leases = _leases(pg_url)
    assert sorted(leases) == sorted(jobs)
    for j, rows in leases.items():
        assert [r[0] for r in rows] == list(range(1, finals[j].attempts + 1))
        for (_, _, _, expires, ended), (_, _, claimed, _, _) in itertools.pairwise(rows):
            assert claimed >= (ended or expires), f"{j}: claimed while the previous lease held"
        assert rows[-1][4] is not None  # the last run ended properly
    first, second = leases[victim]
    assert first[1] == killed and first[4] is None and second[1] in survivors

    # ... and by the replicas' logs (one clock: this machine's): runs never overlap, the
    # takeover starts after the kill and resumes from the checkpoint.
    logs = {n: r.logs() for n, r in reps.items()}
    runs = _log_intervals(logs, killed, kill_time)
    for j in jobs:
        spans = sorted(runs[j])
        assert [s[3] for s in spans] == list(range(1, finals[j].attempts + 1)), (j, spans)
        for a, b in itertools.pairwise(spans):
            assert b[0] >= a[1], f"{j} ran on {a[2]} and {b[2]} at once"
    taker = second[1]
    takeover = max(runs[victim])
    assert takeover[2] == taker and takeover[0] > kill_time - 0.01
    assert re.search(rf"job {victim} resumes at epoch [2-{EPOCHS}]", logs[taker])

    # One version per job (a stale worker never published a second one), and the weights of
    # every job, the resumed one included, equal the single-node run's.
    for i, j in enumerate(jobs):
        m = cs[survivors[-1]].get_model(f"m{i}")
        assert [(v.version, v.job_id) for v in m.versions] == [(1, j)]
        got = _weights(cs[survivors[-1]], f"m{i}", tmp_path / f"got{i}.npz")
        for name, value in expected[i].items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-7, err_msg=name)

    # WatchJob: on the replica that trains a job (board) and on one that never did (polling).
    # Each job has one: it ran on at most two replicas, one of them perhaps the killed one.
    remote_watches = set()
    for w in watches:
        w.join(60)
        if w.worker == killed:
            continue
        trained_by = {r[1] for r in leases[w.job_id]}
        w.check(remote=w.worker not in trained_by)
        if w.worker not in trained_by:
            remote_watches.add(w.job_id)
    assert remote_watches == set(jobs)

    # A replica started now sees everything, and every replica answers Infer identically.
    late = spawn(tmp_path / "r4", *flags, "--worker-id", "r4")
    late.wait_ready()
    cs["r4"] = late.client(timeout=60)
    c4 = cs["r4"]
    assert [m.name for m in c4.list_models()] == [f"m{i}" for i in range(JOBS)]
    assert all(m.latest_version == 1 for m in c4.list_models())
    assert [d.name for d in c4.list_datasets()] == ["digits"]
    assert {j.id: (j.state, j.attempts) for j in c4.list_jobs()} == {
        j: ("SUCCEEDED", f.attempts) for j, f in finals.items()
    }
    for i in range(JOBS):
        out = {n: c.infer(f"m{i}", x[:64]) for n, c in cs.items()}
        for n, r in out.items():
            assert r.version == 1, n
            np.testing.assert_array_equal(r.logits, out["r4"].logits, err_msg=n)
    for c in cs.values():
        c.close()


def _manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """deploy/k8s/scale-out's kustomization, resolved file by file (no kubectl needed)."""
    import yaml

    root = Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "scale-out"
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    docs = [
        d for f in kustomization["resources"] for d in yaml.safe_load_all((root / f).read_text())
    ]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs if d}


def test_k8s_scale_out_manifests() -> None:
    m = _manifests()
    deploy = m[("Deployment", "cnnd")]
    assert deploy["spec"]["replicas"] == 3
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "cnnd:latest"
    env = {e["name"]: e for e in c["env"]}
    store = env["CNND_STORE"]["valueFrom"]["secretKeyRef"]
    assert m[("Secret", store["name"])]["stringData"][store["key"]].startswith("postgresql://")
    assert "--metrics-port=9464" in c["args"] and "--host=0.0.0.0" in c["args"]
    assert "CNND_ADMIN_TOKEN" in env  # a non-loopback bind needs authentication
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 50051, probe
    assert set(c["resources"]) == {"requests", "limits"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    mounts = {v["mountPath"]: v["name"] for v in c["volumeMounts"]}
    assert env["NUMBA_CACHE_DIR"]["value"].startswith(tuple(mounts)) and "/tmp" in mounts
    assert all("emptyDir" in v for v in pod["volumes"])  # no per-pod state
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert m[("PodDisruptionBudget", "cnnd")]["spec"]["selector"]["matchLabels"] == selector
    svc = m[("Service", "cnnd")]
    assert svc["spec"]["selector"] == selector
    assert {p["port"] for p in svc["spec"]["ports"]} == {50051, 9464}
    assert ("StatefulSet", "cnnd-postgres") in m and ("Service", "cnnd-postgres") in m
