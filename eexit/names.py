"""The names of the registered components (policies, losses, datasets) read from the source of
the modules that register them, without importing those modules.

The command line lists these names in its help texts, and `eexit --help` / `eexit --version`
must answer before torch and transformers are imported (seconds). The `@register_...("name")`
decorators stay the one source of truth: this module reads them as text, and
tests/test_names.py checks that what it reads equals the registries after import.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# calibrate's risks measured on decoded prompts (eexit/calibration/sequence.py); the others are
# token risks read teacher-forced
SEQUENCE_RISKS = ("sequence-mismatch", "sequence-rouge")
TOKEN_RISKS = ("consistency", "loss")

# what `--dataset` accepts beyond the registered names (eexit.data.names lists the same)
DATASET_PATTERNS = [
    "hf:<hub name>[:<config>]",
    "<file>.txt|.jsonl|.csv|.parquet",
    "<folder of split files>",
]


@cache
def declared(where: str, *decorators: str) -> list[str]:
    """Sorted names registered by `@decorator("name")` in `where` (a module file or a package
    folder, relative to the eexit package), for any of the given decorator names."""
    path = ROOT / where
    files = sorted(path.glob("*.py")) if path.is_dir() else [path]
    alternatives = "|".join(re.escape(d) for d in decorators)
    pattern = re.compile(rf"^@(?:{alternatives})\(\s*[\"']([^\"']+)[\"']\s*\)", re.MULTILINE)
    return sorted({m for f in files for m in pattern.findall(f.read_text(encoding="utf-8"))})


def policy_names() -> list[str]:
    return declared("policies", "register_policy", "POLICIES.register")


def loss_names() -> list[str]:
    return declared("training/losses.py", "register_loss", "LOSSES.register")


def dataset_names() -> list[str]:
    """As `eexit.data.names.dataset_names`: the corpora, the task datasets, then the patterns."""
    corpora = declared("data/corpora.py", "CORPORA.register")
    tasks = declared("data/task_data.py", "register_task_data", "TASK_DATA.register")
    return corpora + tasks + DATASET_PATTERNS
