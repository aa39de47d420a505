"""Tasks: model + loss -> dict with "loss". Add one file and one line in TASKS."""

from foundation.tasks.classification import ClassificationTask

TASKS = {
    "classification": ClassificationTask,
}
