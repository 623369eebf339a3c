"""Progress of long work (convert, quantize, eval, bench): rich's bar on a terminal; through a pipe or into a
log file (CI, nohup, Kubernetes), where rich draws nothing until the end, one plain line every few seconds."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskID, TextColumn, TimeElapsedColumn

LOG_EVERY_S = 10.0


class LogLines(Progress):
    """A Progress that draws no bar and logs each task as `description: done/total (pct%), elapsed, fields` on
    stderr when every_s has passed since its last line, and when it completes (work that ends sooner than
    every_s leaves no line: a log wants the long runs, not one line per quick step)."""

    def __init__(self, every_s: float | None = None):
        super().__init__(disable=True)
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self.last: dict[TaskID, float] = {}
        self.logged: set[TaskID] = set()

    def add_task(self, description: str, *args, **kwargs) -> TaskID:
        task = super().add_task(description, *args, **kwargs)
        self.last[task] = time.monotonic()
        return task

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        task, now = self._tasks[task_id], time.monotonic()
        due = now - self.last[task_id] >= self.every_s
        if not due and not (task.finished and task_id in self.logged):
            return
        if self.last[task_id] == float("inf"):
            return  # its final line is out already
        self.last[task_id] = float("inf") if task.finished else now
        self.logged.add(task_id)
        done = f"{task.completed:.0f}/{task.total:.0f} ({task.percentage:.0f}%)" if task.total else ""
        fields = ", ".join(str(v) for v in task.fields.values() if v not in ("", None))
        elapsed = time.strftime("%H:%M:%S", time.gmtime(task.elapsed or 0))
        line = ", ".join(p for p in (done, elapsed, fields) if p)
        print(f"{task.description}: {line}", file=sys.stderr, flush=True)


def progress(*columns: ProgressColumn, transient: bool = False) -> Progress:
    """columns: what follows the description, the bar and done/total (e.g. a TextColumn of a task field)."""
    if not Console(stderr=True).is_terminal:
        return LogLines()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *columns,
                    TimeElapsedColumn(), console=Console(stderr=True), transient=transient)
