"""Evaluation tasks as data: episodes (history + questions with evidence ids), registered by name."""

from . import demo, locomo, passkey, synthetic  # noqa: F401  (importing registers the tasks)
from .base import (
    MAIN_METRIC,
    TASK_HELP,
    TASKS,
    Episode,
    Question,
    TaskArgs,
    Turn,
    approx_tokens,
    get_task,
    register_task,
)
from .locomo import LoCoMoFormatError, load_locomo

__all__ = [
    "MAIN_METRIC",
    "TASKS",
    "TASK_HELP",
    "Episode",
    "LoCoMoFormatError",
    "Question",
    "TaskArgs",
    "Turn",
    "approx_tokens",
    "get_task",
    "load_locomo",
    "register_task",
]
