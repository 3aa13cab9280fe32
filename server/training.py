"""Background training: the job runner, checkpoints, and the board that feeds WatchJob.

The runner *claims* jobs from the store (oldest first, at most ``max_concurrent`` at once) and
trains each in its own thread, off the RPC threads. A heartbeat renews the leases of the jobs it
runs and notices cancellations made through any replica. Each job checkpoints weights,
optimizer state and its position (epoch, step, running sums) every ``checkpoint_every`` epochs
and when the server drains, so a restarted or replacement worker resumes it exactly.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnd.core import (
    EpochResult,
    NonFiniteLossError,
    Schedule,
    Sequential,
    SpecLimits,
    StepEvent,
    TrainState,
    fit,
    load_npz,
    make_optimizer,
    model_arrays,
)
from cnnd.core.io import npz_bytes
from cnnd.core.optim import Optimizer
from cnnd.server.errors import Unavailable
from cnnd.server.store.base import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    LeaseLost,
    Store,
)

if TYPE_CHECKING:
    from cnnd.server.metrics import Metrics

log = logging.getLogger("cnnd.jobs")


def log_state(job: JobRecord, state: str, detail: str = "") -> None:
    """The one log line of a job state change, with its ids as fields."""
    log.info(
        "job %s %s%s", job.id, state, f": {detail}" if detail else "",
        extra={"job_id": job.id, "model_id": job.model_id, "state": state},
    )  # fmt: skip


PROGRESS_INTERVAL = 0.2  # seconds between progress events to watchers
STORE_INTERVAL = 1.0  # seconds between progress writes to the store


@dataclass
class JobEvent:
    kind: str  # "state", "progress", "epoch"
    job: JobRecord
    epoch: dict[str, Any] | None = None


class JobBoard:
    """Fan-out of live job events to WatchJob streams in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, set[queue.Queue[JobEvent]]] = {}

    def subscribe(self, job_id: str) -> queue.Queue[JobEvent]:
        q: queue.Queue[JobEvent] = queue.Queue(maxsize=256)
        with self._lock:
            self._subs.setdefault(job_id, set()).add(q)
        return q

    def unsubscribe(self, job_id: str, q: queue.Queue[JobEvent]) -> None:
        with self._lock:
            subs = self._subs.get(job_id)
            if subs is not None:
                subs.discard(q)
                if not subs:
                    del self._subs[job_id]

    def publish(self, event: JobEvent) -> None:
        with self._lock:
            subs = list(self._subs.get(event.job.id, ()))
        for q in subs:
            try:
                q.put_nowait(event)
            except queue.Full:
                if event.kind != "progress":  # a slow watcher may miss progress, not states
                    q.get_nowait()
                    q.put_nowait(event)


@dataclass
class _Active:
    job: JobRecord
    stop: threading.Event = field(default_factory=threading.Event)
    reason: str = ""  # why stop was set: "cancel", "drain", "lease"
    thread: threading.Thread | None = None


def checkpoint_bytes(model: Sequential, optimizer: Optimizer, state: TrainState) -> bytes:
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays |= {f"optim/{k}": v for k, v in optimizer.state_dict().items()}
    arrays["__state__"] = np.array(json.dumps(state.to_dict()))
    return npz_bytes(arrays)


def restore_checkpoint(data: bytes, model: Sequential, optimizer: Optimizer) -> TrainState:
    arrays = load_npz(data)
    model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("model/")})
    optimizer.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("optim/")})
    return TrainState.from_dict(json.loads(str(arrays["__state__"])))


def build_optimizer(cfg: dict[str, Any]) -> Optimizer:
    o = cfg["optimizer"]
    return make_optimizer(
        o["name"], o["lr"], momentum=o.get("momentum", 0.0), weight_decay=o["weight_decay"],
        nesterov=o.get("nesterov", False), betas=tuple(o.get("betas", (0.9, 0.999))),
        eps=o.get("eps", 1e-8),
    )  # fmt: skip


def epoch_row(r: EpochResult) -> dict[str, Any]:
    return {
        "epoch": r.epoch, "loss": r.loss, "accuracy": r.accuracy, "val_loss": r.val_loss,
        "val_accuracy": r.val_accuracy, "lr": r.lr, "seconds": r.seconds,
    }  # fmt: skip


class JobRunner:
    """Claims and trains jobs in background threads."""

    def __init__(
        self,
        store: Store,
        limits: SpecLimits,
        worker: str,
        max_concurrent: int = 1,
        lease_seconds: float = 30.0,
        poll_seconds: float = 1.0,
        board: JobBoard | None = None,
        on_version: Callable[[str, int], None] | None = None,
        hooks: Metrics | None = None,
    ) -> None:
        self.store = store
        self.limits = limits
        self.worker = worker
        self.max_concurrent = max_concurrent
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.board = board or JobBoard()
        self.on_version = on_version
        self.hooks = hooks
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._threads: list[threading.Thread] = []

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        for target, name in ((self._schedule, "cnnd-scheduler"), (self._heartbeat, "cnnd-lease")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def drain(self, timeout: float) -> bool:
        """Stop claiming; stop running jobs at their next step, checkpoint them and put them
        back in the queue. True when every job thread ended within ``timeout``."""
        with self._wake:
            self._stopping = True
            active = list(self._active.values())
            for a in active:
                if not a.reason:
                    a.reason = "drain"
                a.stop.set()
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        for a in active:
            if a.thread is not None:
                a.thread.join(max(0.0, deadline - time.monotonic()))
        return all(a.thread is None or not a.thread.is_alive() for a in active)

    def running(self) -> list[str]:
        with self._lock:
            return list(self._active)

    def live(self, job_id: str) -> JobRecord | None:
        """The in-memory record of a job this runner trains (fresher than the store's)."""
        with self._lock:
            a = self._active.get(job_id)
            return replace(a.job) if a else None

    def cancel(self, job_id: str) -> None:
        """Stop a job trained here at its next step (the store already has the request)."""
        with self._lock:
            a = self._active.get(job_id)
            if a is not None:
                a.reason = "cancel"
                a.stop.set()

    # --- threads ------------------------------------------------------------------------
    def _schedule(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
                full = len(self._active) >= self.max_concurrent
            job = None
            if not full:
                try:
                    job = self.store.claim_job(self.worker, self.lease_seconds)
                except Exception:
                    log.exception("claiming a job failed; retrying")
            if job is not None:
                self._launch(job)
                continue
            with self._wake:
                if not self._stopping:
                    self._wake.wait(self.poll_seconds)

    def _launch(self, job: JobRecord) -> None:
        active = _Active(job)
        active.thread = threading.Thread(
            target=self._run_guarded, args=(active,), name=f"cnnd-job-{job.id}", daemon=True
        )
        with self._wake:
            if self._stopping:  # claimed while drain began: give it back
                self.store.release_job(job.id, self.worker)
                return
            self._active[job.id] = active
        active.thread.start()

    def _heartbeat(self) -> None:
        interval = max(0.2, self.lease_seconds / 3)
        while True:
            time.sleep(min(interval, 1.0))
            with self._lock:
                if self._stopping and not self._active:
                    return
                active = list(self._active.values())
            for a in active:
                try:
                    if not self.store.renew_lease(a.job.id, self.worker, self.lease_seconds):
                        a.reason = a.reason or "lease"
                        a.stop.set()
                        continue
                    current = self.store.get_job(a.job.id)
                    if current is not None and current.cancel_requested:
                        a.reason = "cancel"
                        a.stop.set()
                except Exception:
                    log.exception("renewing the lease of job %s failed", a.job.id)

    def _run_guarded(self, a: _Active) -> None:
        try:
            self._run(a)
        finally:
            with self._wake:
                self._active.pop(a.job.id, None)
                self._wake.notify_all()

    def _publish(self, a: _Active, kind: str, epoch: dict[str, Any] | None = None) -> None:
        self.board.publish(JobEvent(kind, replace(a.job), epoch))

    def _finish(self, a: _Active, state: str, reason: str = "", version: int = 0) -> None:
        a.job = self.store.finish_job(a.job.id, self.worker, state, reason, version, a.job.history)
        log_state(a.job, state, reason)
        self._publish(a, "state")
        if self.hooks:
            self.hooks.job_finished(a.job)

    def _run(self, a: _Active) -> None:
        job = a.job
        cfg = job.config
        log_state(job, RUNNING, f"attempt {job.attempts}")
        self._publish(a, "state")
        if self.hooks:
            self.hooks.job_started(job)
        try:
            model, optimizer, state, data = self._prepare(job)
        except LeaseLost:
            return
        except Exception as e:
            log.exception("job %s could not start", job.id)
            self._safe_finish(a, FAILED, f"could not start: {e}")
            return
        x, y, validation = data
        last_store = 0.0
        last_event = 0.0
        started = time.monotonic()
        step_ema = 0.0

        def on_step(ev: StepEvent) -> None:
            nonlocal last_store, last_event, step_ema
            step_ema = ev.seconds if step_ema == 0 else 0.9 * step_ema + 0.1 * ev.seconds
            left = (ev.epochs - ev.epoch) * ev.steps + (ev.steps - ev.step)
            a.job.progress = {
                "epoch": ev.epoch, "epochs": ev.epochs, "step": ev.step, "steps": ev.steps,
                "loss": ev.loss, "accuracy": ev.accuracy,
                "samples_per_second": ev.samples_per_second, "eta_seconds": left * step_ema,
                "learning_rate": ev.lr,
            }  # fmt: skip
            if self.hooks:
                self.hooks.job_step(a.job, ev, ev.seconds)
            t = time.monotonic()
            if t - last_event >= PROGRESS_INTERVAL:
                last_event = t
                self._publish(a, "progress")
            if t - last_store >= STORE_INTERVAL:
                last_store = t
                self.store.update_progress(job.id, self.worker, a.job.progress, a.job.history)

        def on_epoch(result: EpochResult, st: TrainState) -> None:
            row = epoch_row(result)
            a.job.history = [epoch_row(r) for r in st.history]
            self._publish(a, "epoch", row)
            if self.hooks:
                self.hooks.job_epoch_end(a.job, row)
            last = st.epoch >= cfg["epochs"] or st.stopped_early
            if not last and st.epoch % cfg["checkpoint_every"] == 0:
                data = checkpoint_bytes(model, optimizer, st)
                self.store.put_checkpoint(job.id, self.worker, data)
            self.store.update_progress(job.id, self.worker, a.job.progress, a.job.history)

        try:
            result = fit(
                model, x, y, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                optimizer=optimizer, schedule=Schedule(**cfg["schedule"]), validation=validation,
                seed=cfg["seed"], patience=cfg["patience"], on_step=on_step, on_epoch=on_epoch,
                should_stop=a.stop.is_set, state=state,
            )  # fmt: skip
            if result.completed:
                weights = npz_bytes(model_arrays(model))
                # add_version is not fenced: confirm (and extend) the lease right before it, so
                # a worker whose job another replica took over publishes no second version.
                if not self.store.renew_lease(job.id, self.worker, self.lease_seconds):
                    raise LeaseLost(f"{self.worker} no longer holds job {job.id}")
                version = self.store.add_version(
                    job.model_id, weights, job.id, "train", a.job.history
                )
                if self.on_version:  # before SUCCEEDED is visible: no one waits on a stale view
                    self.on_version(job.model_id, version.version)
                self._finish(a, SUCCEEDED, version=version.version)
                self.store.delete_checkpoint(job.id)
            elif a.reason == "cancel":
                self._finish(a, CANCELLED, "cancelled by request")
                self.store.delete_checkpoint(job.id)
            elif a.reason == "drain":
                self.store.put_checkpoint(
                    job.id, self.worker, checkpoint_bytes(model, optimizer, result.state)
                )
                self.store.release_job(job.id, self.worker)
                log_state(job, "QUEUED", "checkpointed and queued for the next start")
            else:
                log.warning("job %s: lease lost; another worker continues it", job.id)
        except LeaseLost:
            log.warning("job %s: lease lost; another worker continues it", job.id)
        except Unavailable as e:
            # The store is unreachable: the job is not at fault. Stop; its lease expires and
            # it is claimed again (here or elsewhere) once the store answers.
            log.warning("job %s stopped: store unavailable (%s); it will be resumed", job.id, e)
        except NonFiniteLossError as e:
            kept = self.store.get_checkpoint(job.id) is not None
            note = "; the last finite checkpoint is kept" if kept else ""
            self._safe_finish(a, FAILED, f"{e}{note}")
        except Exception as e:
            log.exception("job %s failed", job.id)
            self._safe_finish(a, FAILED, f"internal error: {type(e).__name__}: {e}")
        finally:
            if self.hooks:
                self.hooks.job_stopped(a.job, time.monotonic() - started)

    def _safe_finish(self, a: _Active, state: str, reason: str) -> None:
        try:
            self._finish(a, state, reason)
        except LeaseLost:
            log.warning("job %s: lease lost before it could be marked %s", a.job.id, state)

    def _prepare(
        self, job: JobRecord
    ) -> tuple[Sequential, Optimizer, TrainState | None, tuple[Any, Any, Any]]:
        cfg = job.config
        record = self.store.get_model(job.model_id)
        if record is None:
            raise ValueError(f"model {job.model_id} no longer exists")
        model = Sequential.from_spec(record.spec, seed=record.seed, limits=self.limits)
        if cfg["initial_version"]:
            arrays = load_npz(self.store.get_weights(record.id, cfg["initial_version"]))
            model.load_state_dict({k: v for k, v in arrays.items() if not k.startswith("__")})
        x, y = self.store.load_dataset(job.dataset_id)
        validation: Any = None
        if cfg["validation_dataset_id"]:
            validation = self.store.load_dataset(cfg["validation_dataset_id"])
        elif cfg["validation_fraction"]:
            validation = float(cfg["validation_fraction"])
        optimizer = build_optimizer(cfg)
        state = None
        data = self.store.get_checkpoint(job.id)
        if data is not None:
            state = restore_checkpoint(data, model, optimizer)
            log.info(
                "job %s resumes at epoch %d step %d", job.id, state.epoch + 1, state.step + 1,
                extra={"job_id": job.id},
            )  # fmt: skip
            job.history = [epoch_row(r) for r in state.history]
        return model, optimizer, state, (x, y, validation)
