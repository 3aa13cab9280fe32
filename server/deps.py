"""What the handlers need, built once by the app and passed in (no globals)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from cnnd.server.config import ServerConfig
from cnnd.server.registry import Registry
from cnnd.server.store.base import Store
from cnnd.server.training import JobBoard, JobRunner


@dataclass
class Deps:
    config: ServerConfig
    store: Store
    registry: Registry
    runner: JobRunner
    board: JobBoard
    metrics: Any = None  # cnnd.server.metrics.Metrics, or None
    batcher: Any = None  # cnnd.server.batching.Batcher, or None
    shutting_down: threading.Event = field(default_factory=threading.Event)
