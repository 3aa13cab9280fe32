"""Train, GetJob, ListJobs, CancelJob, WatchJob."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator

from cnnd.core import validate_spec
from cnnd.server import convert
from cnnd.server.deps import Deps
from cnnd.server.errors import FailedPrecondition, InvalidArgument, NotFound
from cnnd.server.handlers.datasets import dataset
from cnnd.server.store.base import TERMINAL, JobRecord, now
from cnnd.server.training import JobEvent, log_state
from cnnd.server.validate import (
    check_key,
    decode_page_token,
    encode_page_token,
    new_id,
    page_size,
)
from cnnd.v1 import jobs_pb2

WATCH_POLL = 0.5  # seconds between store polls for jobs trained elsewhere
_KIND = {
    "snapshot": jobs_pb2.WatchJobResponse.KIND_SNAPSHOT,
    "state": jobs_pb2.WatchJobResponse.KIND_STATE,
    "progress": jobs_pb2.WatchJobResponse.KIND_PROGRESS,
    "epoch": jobs_pb2.WatchJobResponse.KIND_EPOCH,
}


def job_message(deps: Deps, job: JobRecord) -> jobs_pb2.Job:
    position = deps.store.queue_position(job.id) if job.state == "QUEUED" else 0
    return convert.job_to_proto(job, position)


def train(deps: Deps, req: jobs_pb2.TrainRequest) -> jobs_pb2.Job:
    """Check everything a job will need now, so that a job fails later only for reasons
    training itself finds (a diverging loss); then queue it and return at once."""
    cfg = convert.train_config(req)
    model = deps.registry.record(check_key(req.model_id, "model_id"))
    data = dataset(deps, req.dataset_id)
    _, summary = validate_spec(model.spec, deps.config.limits.spec_limits())
    if tuple(data.sample_shape) != summary.input_shape:
        raise InvalidArgument(
            f"dataset {data.name} has samples of shape {list(data.sample_shape)}; model "
            f"{model.name} expects {list(summary.input_shape)}",
            "dataset_id",
        )
    classes = summary.output_shape[0]
    if data.num_classes > classes:
        raise InvalidArgument(
            f"dataset {data.name} has {data.num_classes} classes; model {model.name} scores "
            f"only {classes}",
            "dataset_id",
        )
    if cfg["validation_dataset_id"]:
        val = dataset(deps, cfg["validation_dataset_id"], "validation_dataset_id")
        if tuple(val.sample_shape) != tuple(data.sample_shape) or val.num_classes > classes:
            raise InvalidArgument(
                f"validation dataset {val.name} does not match the model's input or classes",
                "validation_dataset_id",
            )
        cfg["validation_dataset_id"] = val.id
    elif cfg["validation_fraction"]:
        held = round(cfg["validation_fraction"] * data.sample_count)
        if held < 1 or held >= data.sample_count:
            raise InvalidArgument(
                f"validation_fraction {cfg['validation_fraction']} of {data.sample_count} "
                "samples leaves no validation or no training data",
                "validation_fraction",
            )
    if cfg["initial_version"] > model.latest_version:
        raise NotFound(
            f"model {model.name} has no version {cfg['initial_version']}", "initial_version"
        )
    cfg["model_id"], cfg["dataset_id"] = model.id, data.id
    job = JobRecord(
        id=new_id("job"), model_id=model.id, dataset_id=data.id, state="QUEUED", config=cfg,
        create_time=now(),
    )  # fmt: skip
    deps.store.create_job(job, deps.config.limits.max_queued_jobs)
    log_state(job, "QUEUED")
    deps.runner.wake()
    return job_message(deps, job)


def _job(deps: Deps, job_id: str) -> JobRecord:
    job = deps.store.get_job(check_key(job_id, "job_id"))
    if job is None:
        raise NotFound(f"no job {job_id!r}", "job_id")
    live = deps.runner.live(job.id) if job.state == "RUNNING" else None
    return live or job


def get_job(deps: Deps, req: jobs_pb2.GetJobRequest) -> jobs_pb2.Job:
    return job_message(deps, _job(deps, req.job_id))


def list_jobs(deps: Deps, req: jobs_pb2.ListJobsRequest) -> jobs_pb2.ListJobsResponse:
    size = page_size(req.page_size)
    model_id = ""
    if req.model_id:
        model_id = deps.registry.record(check_key(req.model_id, "model_id")).id
    state = convert.JOB_STATE_NAMES.get(req.state, "") if req.state else ""
    if req.state and not state:
        raise InvalidArgument(f"unknown job state {req.state}", "state")
    jobs = deps.store.list_jobs(size + 1, decode_page_token(req.page_token), model_id, state)
    out = jobs_pb2.ListJobsResponse(jobs=[job_message(deps, j) for j in jobs[:size]])
    if len(jobs) > size:
        out.next_page_token = encode_page_token(jobs[size - 1].id)
    return out


def cancel_job(deps: Deps, req: jobs_pb2.CancelJobRequest) -> jobs_pb2.Job:
    job = _job(deps, req.job_id)
    if job.state in TERMINAL:
        raise FailedPrecondition(f"job {job.id} already ended: {job.state}")
    job = deps.store.cancel_job(job.id)
    if job.state == "CANCELLED":  # it was still queued; a running one logs when it stops
        log_state(job, "CANCELLED", "cancelled while queued")
    deps.runner.cancel(job.id)
    return job_message(deps, job)


def _event(
    deps: Deps, kind: str, job: JobRecord, epoch: dict | None = None
) -> jobs_pb2.WatchJobResponse:  # type: ignore[type-arg]
    ev = jobs_pb2.WatchJobResponse(kind=_KIND[kind], job=job_message(deps, job))
    ev.time.FromNanoseconds(int(now() * 1e9))
    if epoch is not None:
        ev.epoch.CopyFrom(convert.epoch_to_proto(epoch))
    return ev


def watch_job(
    deps: Deps, req: jobs_pb2.WatchJobRequest, active: Callable[[], bool]
) -> Iterator[jobs_pb2.WatchJobResponse]:
    """A snapshot first, then live events: from this process's board when the job trains
    here, else from polling the store (the job trains on another replica, or waits)."""
    job = _job(deps, req.job_id)
    sub = deps.board.subscribe(job.id)
    try:
        yield _event(deps, "snapshot", job)
        last = job
        while job.state not in TERMINAL and active() and not deps.shutting_down.is_set():
            try:
                ev: JobEvent | None = sub.get(timeout=WATCH_POLL)
            except queue.Empty:
                ev = None
            if ev is not None:
                job = ev.job
                yield _event(deps, ev.kind, job, ev.epoch)
                last = job
                continue
            if deps.runner.live(job.id) is not None:
                continue  # trained here: the board speaks for it
            current = deps.store.get_job(job.id)
            if current is None:
                return
            job = current
            yield from _diff(deps, last, job)
            last = job
    finally:
        deps.board.unsubscribe(job.id, sub)


def _diff(deps: Deps, old: JobRecord, new: JobRecord) -> Iterator[jobs_pb2.WatchJobResponse]:
    """Events that turn a polled ``old`` into ``new``."""
    for row in new.history[len(old.history) :]:
        yield _event(deps, "epoch", new, row)
    if new.state != old.state:
        yield _event(deps, "state", new)
    elif new.progress != old.progress:
        yield _event(deps, "progress", new)
