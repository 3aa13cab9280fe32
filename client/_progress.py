"""Progress display for ``Job.wait`` and uploads: a live tqdm bar on a terminal, plain lines
(one per epoch) when the output is a file or a pipe, so logs stay readable."""

from __future__ import annotations

import sys
from typing import IO, Any

from cnnd.client._types import JobEvent


def _is_tty(stream: IO[str]) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


class JobProgress:
    """Feed it JobEvents; it draws them."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = _is_tty(self.stream)
        self.bar: Any = None
        self.epoch = 0

    def _bar(self, total: int, epoch: int, epochs: int) -> Any:
        from tqdm import tqdm

        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(
            total=total, desc=f"epoch {epoch}/{epochs}", file=self.stream, unit="step",
            dynamic_ncols=True, leave=True,
        )  # fmt: skip
        return self.bar

    def update(self, ev: JobEvent) -> None:
        p = ev.job.progress
        if ev.kind in ("snapshot", "state") and ev.job.state in ("QUEUED",):
            pos = f" (position {ev.job.queue_position})" if ev.job.queue_position else ""
            self._line(f"job {ev.job.id} queued{pos}")
        if ev.kind == "progress" and self.live and p.steps:
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
            e = ev.epoch
            if self.bar is not None:
                self.bar.n = self.bar.total
                self.bar.refresh()
                self.bar.close()
                self.bar = None
            val = ""
            if e.val_loss is not None:
                val = f"  val_loss {e.val_loss:.4f}  val_acc {e.val_accuracy:.4f}"
            epochs = p.epochs or "?"
            self._line(
                f"epoch {e.epoch}/{epochs}  loss {e.loss:.4f}  acc {e.accuracy:.4f}{val}"
                f"  ({e.seconds:.1f}s)"
            )
        if ev.job.done:
            self.close()
            reason = f": {ev.job.failure_reason}" if ev.job.failure_reason else ""
            version = f" -> version {ev.job.result_version}" if ev.job.result_version else ""
            self._line(f"job {ev.job.id} {ev.job.state}{version}{reason}")

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def byte_bar(total: int, desc: str, enabled: bool) -> Any:
    """A bytes progress bar (tqdm) or None when disabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr)
