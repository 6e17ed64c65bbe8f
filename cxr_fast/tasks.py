"""The six binary tasks of the study, in the order of the original `label_index`."""

from __future__ import annotations

from cxr_fast.errors import CxrError

TASKS: tuple[str, ...] = ("cardiomegaly", "effusion", "edema", "fracture", "pneumonia", "no_finding")

# Source columns per task (CheXpert vocabulary, shared by MIMIC-CXR). `pneumonia` is the
# union of two columns; see cohort.task_labels for how the union treats uncertain values.
TASK_COLUMNS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly",),
    "effusion": ("Pleural Effusion",),
    "edema": ("Edema",),
    "fracture": ("Fracture",),
    "pneumonia": ("Consolidation", "Pneumonia"),
    "no_finding": ("No Finding",),
}

CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)


def task_name(task: str | int) -> str:
    """Accept a slug (`effusion`) or the original label index (`1`, as int or string)."""
    text = str(task).strip()
    if text.isdigit():
        index = int(text)
        if index < len(TASKS):
            return TASKS[index]
        raise CxrError(f"task index {index} is out of range 0-{len(TASKS) - 1} ({', '.join(TASKS)})")
    if text in TASKS:
        return text
    raise CxrError(f"unknown task {text!r}; known: {', '.join(TASKS)}")
