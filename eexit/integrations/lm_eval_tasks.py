"""lm-eval tasks checked before any model loads: the include folder, the task names against
lm-eval's index (with did-you-mean), and the tasks built (YAML and data), each failure one line.
Kept apart from the model (`lm_eval_harness`) because it needs no model at all: `eexit lm-eval`
runs it first, so a mistyped task costs no model load.
"""

from __future__ import annotations

import difflib
import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eexit.errors import EexitError


@dataclass
class Tasks:
    """lm-eval tasks built and checked before the model loads (what `simple_evaluate` runs)."""

    names: list[str]
    manager: object  # lm_eval.tasks.TaskManager
    built: list  # Task / Group objects, or the names where this lm-eval cannot take objects


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None):
    """lm-eval's task index (all its YAMLs, plus an include folder): built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def prepare_tasks(names: list[str], include_path: str | None = None) -> Tasks:
    """Check the include folder and the task names against lm-eval's index (did-you-mean), then
    build the tasks (their YAML and data): any failure is one line, before a model loads."""
    if include_path is not None and not Path(include_path).is_dir():
        raise EexitError(f"--include-path {include_path}: no such folder")
    if not names:
        raise EexitError("--tasks: give at least one lm-eval task name")
    with _lm_eval_logs(logging.ERROR):
        manager = task_manager(str(Path(include_path).resolve()) if include_path else None)
    known = set(manager.all_tasks)
    wanted: list[str] = []
    for name in names:
        if any(c in name for c in "*?["):
            matched = manager.match_tasks([name])
            if not matched:
                raise EexitError(f"no lm-eval task matches {name!r}")
            wanted += matched
        elif name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            wanted.append(name)
        else:
            raise _unknown_task(name, manager, include_path)
    if not hasattr(manager, "load"):  # an older lm-eval: check by building, run by name
        from lm_eval.tasks import get_task_dict

        with _lm_eval_logs(logging.ERROR):
            _build(lambda: get_task_dict(wanted, manager), ", ".join(wanted))
        return Tasks(wanted, manager, wanted)
    built = []
    for name in wanted:
        with _lm_eval_logs(logging.ERROR):
            loaded = _build(lambda name=name: manager.load([name]), name)
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        else:
            built += list(loaded["tasks"].values())
    return Tasks(wanted, manager, built)


def _build(make, what: str):
    try:
        return make()
    except Exception as e:  # noqa: BLE001  (a malformed YAML, missing data, ...: one line)
        raise EexitError(f"lm-eval task {what}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = text.strip().splitlines()[0][:300] if text.strip() else ""
    return f"{type(e).__name__}: {text}" if text and text != "None" else type(e).__name__


def _unknown_task(name: str, manager, include_path: str | None) -> EexitError:
    """Unknown task: a did-you-mean over the index (the include folder's tasks first), the
    include folder's own tasks, and its YAML files that could not be read (lm-eval's index skips
    them without a word)."""
    own: list[str] = []
    unread = ""
    if include_path:
        root = Path(include_path).resolve()
        own = sorted(
            n
            for n, e in getattr(manager, "task_index", {}).items()
            if e.yaml_path and root in Path(e.yaml_path).parents
        )
        unread = _unreadable_yamls(root)
    close = difflib.get_close_matches(name, own, n=1) or difflib.get_close_matches(
        name, manager.all_tasks, n=1
    )
    message = f"unknown lm-eval task {name!r}"
    message += f" (did you mean {close[0]!r}?)" if close else ""
    if include_path:
        shown = ", ".join(own[:20]) + (", ..." if len(own) > 20 else "")
        message += f"; --include-path has: {shown or 'no task'}"
    message += f"; `lm-eval ls tasks` lists all {len(manager.all_tasks)}"
    if unread:
        message += f"; unreadable YAML under --include-path: {unread}"
    return EexitError(message)


def _unreadable_yamls(root: Path) -> str:
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # another lm-eval layout: no hint
        return ""
    for path in sorted(root.glob("**/*.y*ml")):
        try:
            load_yaml(path, resolve_func=False)
        except Exception as e:  # noqa: BLE001  (what lm-eval's index skips silently)
            return f"{path.name} ({_first_line(e)})"
    return ""


@contextmanager
def _lm_eval_logs(level: int):
    """lm-eval's logger at `level` while the tasks are checked (its warnings would precede the
    one-line error)."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)
