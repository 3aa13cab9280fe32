"""Model lookup and a bounded cache of built models, shared by Infer, Inspect and Export.

Versions are immutable, so a cached (model, version) never goes stale; "latest" is resolved
against the store on each call, so a version committed by a job (here or on another replica)
is served from the next call on, and never before its weights are complete.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from cnnd.core import Sequential, SpecLimits, SpecSummary, load_npz, validate_spec
from cnnd.server.errors import FailedPrecondition, NotFound, ServiceError
from cnnd.server.store.base import ModelRecord, Store

RECORD_TTL = 0.25  # seconds a model record serves Infer before the store is asked again


@dataclass(frozen=True)
class Loaded:
    record: ModelRecord
    version: int  # 0: the initial weights of a model that was never trained
    model: Sequential


class Registry:
    def __init__(self, store: Store, limits: SpecLimits, capacity: int = 16) -> None:
        self.store = store
        self.limits = limits
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, int], Sequential] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, int], threading.Lock] = {}
        self._records: dict[str, tuple[float, ModelRecord]] = {}  # key -> (when, record)
        self._generation = 0  # bumped by refresh/forget

    def record(self, key: str, field: str = "model_id") -> ModelRecord:
        record = self.store.get_model(key)
        if record is None:
            raise NotFound(f"no model with id or name {key!r}", field)
        return record

    def summary(self, record: ModelRecord) -> SpecSummary:
        return validate_spec(record.spec, self.limits)[1]

    def resolve_version(self, record: ModelRecord, version: int, allow_initial: bool) -> int:
        if version < 0:
            raise NotFound(f"version must be >= 0, got {version}", "version")
        if version == 0:
            if record.latest_version == 0 and not allow_initial:
                raise FailedPrecondition(
                    f"model {record.name} ({record.id}) has no trained version yet; train it "
                    "first (Train), or import weights (ImportModel)"
                )
            return record.latest_version
        if version > record.latest_version:
            raise NotFound(
                f"model {record.name} has no version {version} (latest is {record.latest_version})",
                "version",
            )
        return version

    def load(self, key: str, version: int = 0, allow_initial: bool = False) -> Loaded:
        """The model ``key`` (id or name) at ``version`` (0: latest), built and cached.

        The record is reused for up to ``RECORD_TTL`` seconds (a store query per Infer call
        cost ~45 us). Staleness can only delay a newer version by that long: a version this
        process commits invalidates at once (``forget``), and a lookup that fails on a cached
        record is retried against the store before it is reported.
        """
        now = time.monotonic()
        with self._lock:
            hit = self._records.get(key)
            generation = self._generation
        if hit is not None and now - hit[0] < RECORD_TTL:
            try:
                record = hit[1]
                v = self.resolve_version(record, version, allow_initial)
                return Loaded(record, v, self.get(record, v))
            except ServiceError:
                pass  # maybe stale: ask the store
        record = self.record(key)
        v = self.resolve_version(record, version, allow_initial)
        with self._lock:
            # Not if a refresh or forget came meanwhile: this record may predate it.
            if self._generation == generation:
                self._records[key] = (now, record)
        return Loaded(record, v, self.get(record, v))

    def get(self, record: ModelRecord, version: int) -> Sequential:
        key = (record.id, version)
        with self._lock:
            model = self._cache.get(key)
            if model is not None:
                self._cache.move_to_end(key)
                return model
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one build per key, others wait for it
            with self._lock:
                model = self._cache.get(key)
            if model is None:
                model = self.build(record, version)
                with self._lock:
                    self._cache[key] = model
                    while len(self._cache) > self.capacity:
                        self._cache.popitem(last=False)
            with self._lock:
                self._loading.pop(key, None)
        return model

    def build(self, record: ModelRecord, version: int) -> Sequential:
        """A fresh model instance (not cached), e.g. for Inspect, which needs its own copy."""
        model = Sequential.from_spec(record.spec, seed=record.seed, limits=self.limits)
        if version > 0:
            arrays = load_npz(self.store.get_weights(record.id, version))
            model.load_state_dict({k: v for k, v in arrays.items() if not k.startswith("__")})
        return model

    def refresh(self, model_id: str) -> None:
        """Drop the cached record of a model whose settings changed (its batching policy):
        the next call reads it from the store. Built versions stay; their weights are the same."""
        with self._lock:
            self._drop_records(model_id)

    def _drop_records(self, model_id: str) -> None:
        """(Under the lock.) Forget the model's cached records, and make lookups already
        reading the store not cache theirs (see load)."""
        self._records = {k: v for k, v in self._records.items() if v[1].id != model_id}
        self._generation += 1

    def forget(self, model_id: str, version: int = 0) -> None:
        """Drop what is cached about a model: after a delete, or when it gained a version."""
        with self._lock:
            self._drop_records(model_id)
            if version == 0:  # deleted: its built versions go too (a new version changes none)
                for key in [k for k in self._cache if k[0] == model_id]:
                    del self._cache[key]
