"""Progress of a running task where people look: luigid's task list (status message and percentage) and the
terminal (one line at least every 30 seconds), from the figures the long jobs report (extractor.progress)."""
from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence
from types import TracebackType

import luigi

from extractor import progress
from extractor.progress import LINE_PREFIX, PROGRESS_ENV, Progress, ProgressFn, duration

PRINT_EVERY = 20.0
"""Seconds between terminal lines while the job reports (it reports every 5 s as it advances)."""
SILENT_AFTER = 25.0
"""Seconds without a terminal line after which the task says so itself: a long step, an evaluation, a start."""


class TaskProgress:
    """The progress callback a pipeline task gives its job: luigid's status message and progress bar for the
    task, and a terminal line `[lxmert] <Task> <signature>: <progress>` every PRINT_EVERY seconds and at the end.

    Used as a context manager around the job, it also prints a line when the job has been silent for
    SILENT_AFTER seconds (the last figures and their age), so the terminal never goes quiet for 30 s."""

    def __init__(self, task: luigi.Task) -> None:
        self.task = task
        self.label = f"{task.get_task_family()} {task.output_dir().name}"  # as the task's started / done lines
        self.printed: float | None = None  # progress.clock() of the last line (the throttle; tests fake that clock)
        self.line_at = time.monotonic()  # the last line, or the start, in real time (the watcher's clock)
        self.latest: tuple[float, str] | None = None  # when (real time) the job last reported, and what
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.watcher: threading.Thread | None = None

    def __call__(self, p: Progress) -> None:
        text = p.message()
        if self.task.set_status_message is not None:  # None outside a Luigi worker (a task's run() called directly)
            self.task.set_status_message(text)
            self.task.set_progress_percentage(round(100 * p.fraction, 1))
        with self.lock:
            now = progress.clock()
            self.latest = (time.monotonic(), text)
            if self.printed is None or now - self.printed >= PRINT_EVERY or p.done >= p.total:
                self._print(now, text)

    def _print(self, now: float | None, text: str) -> None:
        if now is not None:
            self.printed = now
        self.line_at = time.monotonic()
        print(f"[lxmert] {self.label}: {text}", flush=True)

    def __enter__(self) -> TaskProgress:
        self.line_at = time.monotonic()
        self.watcher = threading.Thread(target=self._watch, name=f"progress {self.label}", daemon=True)
        self.watcher.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop.set()
        if self.watcher is not None:
            self.watcher.join()

    def _watch(self) -> None:
        """Until the job ends: a line whenever SILENT_AFTER seconds (real time) passed since the last one."""
        started = self.line_at
        while True:
            with self.lock:
                due = self.line_at + SILENT_AFTER - time.monotonic()
            if self.stop.wait(max(due, 0.0)):
                return
            with self.lock:
                now = time.monotonic()
                if now - self.line_at < SILENT_AFTER:
                    continue  # the job printed meanwhile
                if self.latest is None:
                    self._print(None, f"running, no figures yet ({duration(now - started)} in)")
                else:
                    at, text = self.latest
                    self._print(None, f"{text} (reported {duration(now - at)} ago, still running)")


def stream_child(cmd: Sequence[str], env: dict[str, str], on_progress: ProgressFn) -> None:
    """Run a command, passing its output through, except the progress lines, which go to `on_progress`;
    CalledProcessError when it fails, as subprocess.run(check=True)."""
    with subprocess.Popen(list(cmd), env={**env, PROGRESS_ENV: "1"}, stdout=subprocess.PIPE, text=True,
                          bufsize=1) as child:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(LINE_PREFIX):
                on_progress(Progress.from_json(line[len(LINE_PREFIX):]))
            else:
                print(line, end="", flush=True)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, list(cmd))
