"""The two dataset registries and every name `--dataset` accepts, in one place (so that the
LM corpora and the task datasets can name each other without importing each other)."""

from __future__ import annotations

from typing import Callable

from eexit.names import DATASET_PATTERNS
from eexit.registry import Registry, unknown_name_error

# LM corpora: name -> loader returning {split: [documents]}  (eexit.data.corpora)
CORPORA: Registry[Callable[[], dict[str, list[str]]]] = Registry("dataset")
# task datasets: name -> loader returning (task name, {split: [Example]})  (eexit.data.task_data)
TASK_DATA: Registry[Callable] = Registry("task dataset")
PATTERNS = DATASET_PATTERNS  # defined where the CLI's help reads it (no torch)


def dataset_names() -> list[str]:
    """Every registered corpus and task dataset, then the patterns for hub and local files
    (`eexit.data` registers them all on import)."""
    return CORPORA.names() + TASK_DATA.names() + PATTERNS


def unknown_dataset(name: str):
    return unknown_name_error("dataset", name, dataset_names())
