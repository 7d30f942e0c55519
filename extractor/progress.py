"""Progress of a long job (detector training, extraction, pretraining, fine-tuning) as plain figures.

The jobs take an optional callback and hand it a `Progress` at most every `every` seconds (and at the
end), through a `ProgressReporter`; what to do with it (a Luigi status message, a terminal line) is the
caller's business. It lives here, the lowest layer, so the extractor and the training loop share it
without importing the pipeline.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


def clock() -> float:
    """The time source of every throttle here (monotonic seconds); tests replace it with a fake one."""
    return time.monotonic()


@dataclass(frozen=True)
class Progress:
    """Where a job stands: `done` of `total` units (optimiser steps, images), its latest loss, its rate."""

    stage: str                 # what runs: "detector", "extract", "pretrain", "finetune vqa", ...
    done: int
    total: int
    unit: str                  # "step" or "img"
    elapsed_s: float           # since the reporter started (this process: a resumed run counts from its start)
    rate: float | None = None  # examples (or images) per second since the reporter started
    loss: float | None = None  # the latest logged training loss, if the job has one
    pace: float | None = None  # seconds per unit in this process (None until one unit is done here)

    @property
    def fraction(self) -> float:
        """Share done, in [0, 1]."""
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace of this process so far; None before any unit is done here."""
        return None if self.pace is None else self.pace * max(self.total - self.done, 0)

    def message(self) -> str:
        """One line: 'pretrain step 120/1530 (7.8%) loss 3.2134, 412.3 ex/s, 2 min 05 s left'."""
        parts = [f"{self.stage} {self.unit} {self.done:,}/{self.total:,} ({100 * self.fraction:.1f}%)"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.rate is not None:
            parts.append(f"{self.rate:.1f} {'img' if self.unit == 'img' else 'ex'}/s")
        if self.eta_s is not None:
            parts.append(f"{duration(self.eta_s)} left")
        return ", ".join(parts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Progress:
        """Inverse of to_json (a progress line a torchrun child printed)."""
        return cls(**json.loads(text))


ProgressFn = Callable[[Progress], None]


def duration(seconds: float) -> str:
    """'45 s', '2 min 05 s', '3 h 07 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressReporter:
    """Calls `callback` with a Progress at most every `every` seconds, and always for the last unit.

    `update(done)` is cheap between calls (one clock read), so a job may call it every step. `start`
    is the units already done when this process began (a resumed run), left out of the rate.
    """

    def __init__(self, callback: ProgressFn | None, stage: str, total: int, unit: str = "step",
                 examples_per_unit: float = 1.0, every: float = 5.0, start: int = 0) -> None:
        self.callback, self.stage, self.total, self.unit = callback, stage, total, unit
        self.examples_per_unit, self.every, self.start = examples_per_unit, every, start
        self.began = clock()
        self.last: float | None = None

    def update(self, done: int, loss: float | None = None, force: bool = False) -> None:
        """Report `done` units when `every` seconds passed since the last report, at the end, or if forced."""
        if self.callback is None:
            return
        now = clock()
        if not (force or done >= self.total or self.last is None or now - self.last >= self.every):
            return
        self.last = now
        elapsed = now - self.began
        here = done - self.start
        pace = elapsed / here if here > 0 and elapsed > 0 else None
        rate = here * self.examples_per_unit / elapsed if here > 0 and elapsed > 0 else None
        self.callback(Progress(self.stage, done, self.total, self.unit, round(elapsed, 3), rate, loss, pace))


LINE_PREFIX = "[lxmert-progress] "
"""How a training command under torchrun (rank 0) hands its Progress to the pipeline task that launched it."""
PROGRESS_ENV = "LXMERT_PROGRESS_LINES"
"""Set by the launching task (pipeline.progress.stream_child): the command then prints progress lines."""


def print_progress_line(p: Progress) -> None:
    """A launched command's callback: the Progress as one line on stdout, read back by the launching task."""
    print(LINE_PREFIX + p.to_json(), flush=True)


def launched_progress() -> ProgressFn | None:
    """The callback of a training command: progress lines when a pipeline task launched it, else None (tqdm)."""
    return print_progress_line if os.environ.get(PROGRESS_ENV) else None
