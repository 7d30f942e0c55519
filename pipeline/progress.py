"""Progress of a running task where people look: luigid's task list (status message and percentage) and the
terminal (one line at least every 30 seconds), from the figures the long jobs report (extractor.progress)."""
from __future__ import annotations

import subprocess
from collections.abc import Sequence

import luigi

from extractor import progress
from extractor.progress import LINE_PREFIX, PROGRESS_ENV, Progress, ProgressFn

PRINT_EVERY = 20.0
"""Seconds between terminal lines; the jobs report every 5 s while they run, so lines come at least every 25 s."""


class TaskProgress:
    """The progress callback a pipeline task gives its job: luigid's status message and progress bar for the
    task, and a terminal line `[lxmert] <Task> <signature>: <progress>` every PRINT_EVERY seconds and at the end."""

    def __init__(self, task: luigi.Task) -> None:
        self.task = task
        self.label = f"{task.get_task_family()} {task.output_dir().name}"  # as the task's started / done lines
        self.printed: float | None = None

    def __call__(self, p: Progress) -> None:
        text = p.message()
        if self.task.set_status_message is not None:  # None outside a Luigi worker (a task's run() called directly)
            self.task.set_status_message(text)
            self.task.set_progress_percentage(round(100 * p.fraction, 1))
        now = progress.clock()
        if self.printed is None or now - self.printed >= PRINT_EVERY or p.done >= p.total:
            self.printed = now
            print(f"[lxmert] {self.label}: {text}", flush=True)


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

