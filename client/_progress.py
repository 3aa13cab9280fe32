"""Progress display for ``Job.wait`` and uploads: a live tqdm bar on a terminal, plain lines
(one per epoch) when the output is a file or a pipe, so logs stay readable."""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from cnnd.client._types import EpochMetrics, Job, JobEvent


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


class JobProgress:
    """Feed it JobEvents; it draws them on ``stream`` (default: sys.stderr).

    Every epoch is printed once, in order, even by a watcher that joins late (the snapshot's
    history) or reconnects; the final state is printed once.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = _is_tty(self.stream)
        self.bar: Any = None
        self.epoch = 0  # the epoch the bar draws
        self.printed = 0  # the last epoch printed as a line
        self.queued_shown = False
        self.ended = False

    def _bar(self, total: int, epoch: int, epochs: int) -> Any:
        from tqdm import tqdm

        if self.bar is not None:
            self.bar.close()
        # On a terminal that reports no size (a pty nobody sized: some CI runners, `docker
        # exec -t`) tqdm reads 0 columns and -1 rows and draws nothing at all.
        sized = _columns(self.stream) > 0
        self.bar = tqdm(
            total=total, desc=f"epoch {epoch}/{epochs}", file=self.stream, unit="step",
            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20,
            leave=True,
        )  # fmt: skip
        return self.bar

    def update(self, ev: JobEvent) -> None:
        job, p = ev.job, ev.job.progress
        if job.state == "QUEUED" and not self.queued_shown:
            self.queued_shown = True
            pos = f" (position {job.queue_position})" if job.queue_position else ""
            self._line(f"job {job.id} queued{pos}")
        if ev.kind == "snapshot":
            self._epochs(job, job.history)
        if ev.kind == "progress" and self.live and p.steps and p.epoch > self.printed:
            if self.bar is None or p.epoch != self.epoch:
                self.epoch = p.epoch
                self._bar(p.steps, p.epoch, p.epochs)
            self.bar.n = p.step
            self.bar.set_postfix(
                loss=f"{p.loss:.4f}", acc=f"{p.accuracy:.3f}",
                rate=f"{p.samples_per_second:,.0f}/s", eta=f"{p.eta_seconds:.0f}s",
                refresh=True,
            )  # fmt: skip
        if ev.kind == "epoch" and ev.epoch is not None:
            self._epochs(job, [ev.epoch])
        if job.done:
            self.finish(job)

    def finish(self, job: Job) -> None:
        """Print the epochs not yet shown and the final state (once)."""
        self._epochs(job, job.history)
        self.close()
        if not self.ended:
            self.ended = True
            reason = f": {job.failure_reason}" if job.failure_reason else ""
            version = f" -> version {job.result_version}" if job.result_version else ""
            self._line(f"job {job.id} {job.state}{version}{reason}")

    def _epochs(self, job: Job, rows: list[EpochMetrics]) -> None:
        epochs = job.progress.epochs or job.config.get("epochs") or "?"
        for e in rows:
            if e.epoch <= self.printed:
                continue
            self.printed = e.epoch
            if self.bar is not None:
                self.bar.n = self.bar.total
                self.bar.refresh()
                self.bar.close()
                self.bar = None
            val = ""
            if e.val_loss is not None and e.val_accuracy is not None:
                val = f"  val_loss {e.val_loss:.4f}  val_acc {e.val_accuracy:.4f}"
            self._line(
                f"epoch {e.epoch}/{epochs}  loss {e.loss:.4f}  acc {e.accuracy:.4f}{val}"
                f"  ({e.seconds:.1f}s)"
            )

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _SummaryLine:
    """What an upload shows when stderr is not a terminal: one line once it is done."""

    def __init__(self, total: int, desc: str, stream: IO[str]) -> None:
        self.total, self.desc, self.stream = total, desc, stream
        self.n = 0
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        seconds = time.perf_counter() - self.start
        print(f"{self.desc}: {self.n / 1e6:.1f} of {self.total / 1e6:.1f} MB sent in "
              f"{seconds:.1f} s", file=self.stream, flush=True)  # fmt: skip


def byte_bar(total: int, desc: str, enabled: bool, stream: IO[str] | None = None) -> Any:
    """A bytes progress bar (with ``update(n)`` and ``close()``) on ``stream`` (default:
    sys.stderr): tqdm on a terminal, a summary line elsewhere; None when disabled."""
    if not enabled:
        return None
    stream = stream or sys.stderr
    if not _is_tty(stream):
        return _SummaryLine(total, desc, stream)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=stream)
