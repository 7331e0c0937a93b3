"""The layout stays readable: no import cycle between eexit's modules (counting imports inside
functions too), the CLI and the library never import benchmarks or experiments, and the
registries are complete whatever was imported first."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """eexit module -> the eexit modules it imports (anywhere in the file)."""
    files = {module_name(p): p for p in (ROOT / "eexit").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t in files and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_no_import_cycle_between_modules():
    graph = import_graph()
    # a package's __init__ importing its own modules (registration) is not a cycle back up
    for mod in graph:
        graph[mod] = {t for t in graph[mod] if not mod.startswith(t + ".")}
    assert cycles(graph) == []


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_library_does_not_import_scripts():
    for path in (ROOT / "eexit").rglob("*.py"):
        text = path.read_text()
        assert "import benchmarks" not in text and "from benchmarks" not in text, path
        assert "import experiments" not in text and "from experiments" not in text, path


def test_registries_are_complete_whatever_is_imported_first():
    """Importing one leaf module registers everything of its package (14 policies, ...)."""
    code = (
        "import eexit.policies.confidence as c, eexit.training.losses as l, "
        "eexit.data.corpora as d, eexit.models.early_exit as m\n"
        "from eexit.policies import POLICIES\nfrom eexit.training.losses import LOSSES\n"
        "from eexit.data.names import CORPORA, TASK_DATA\n"
        "from eexit.models.families import FAMILIES\n"
        "print(len(POLICIES.names()), len(LOSSES.names()), len(CORPORA.names()),"
        " len(TASK_DATA.names()), ' '.join(FAMILIES.names()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["14", "8", "3", "6", "gpt2", "llama", "qwen2", "t5"]
