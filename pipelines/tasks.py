"""The registry of tasks: every command, API function, writer and the record schema finds a task here by
name. Adding a task is its module (see pipelines/task.py) plus one entry in `TASKS`."""

from __future__ import annotations

from dsvl2.pipelines.ask import AskTask
from dsvl2.pipelines.chart import ChartTask
from dsvl2.pipelines.ground import GroundTask
from dsvl2.pipelines.ocr import OcrTask
from dsvl2.pipelines.table import TableTask
from dsvl2.pipelines.task import Task

TASKS: dict[str, type[Task]] = {task.name: task for task in (OcrTask, TableTask, ChartTask, GroundTask, AskTask)}


def task_type(name: str) -> type[Task]:
    """The task called `name`; ValueError naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})") from None
