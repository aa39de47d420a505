"""Tasks: model + loss -> dict with "loss". Add one file and one line in TASKS."""

from foundation.tasks.classification import ClassificationTask
from foundation.tasks.clip import ClipTask, DeclipTask

TASKS = {
    "classification": ClassificationTask,
    "clip": ClipTask,
    "declip": DeclipTask,
}
