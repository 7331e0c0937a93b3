"""The names the CLI's help lists, read from the source without importing it (`eexit.names`),
are the registries' names; and the CLI module imports neither torch nor transformers, so that
`eexit --version` and `--help` answer at once (timed in benchmarks/cli_startup.py)."""

import subprocess
import sys

from eexit import names


def test_the_names_read_from_the_source_are_the_registries():
    from eexit.data.names import dataset_names
    from eexit.policies import POLICIES
    from eexit.training.losses import LOSSES

    assert names.policy_names() == POLICIES.names()
    assert names.loss_names() == LOSSES.names()
    assert names.dataset_names() == dataset_names()
    assert "max-prob" in names.policy_names() and "layerskip" in names.loss_names()
    assert "wiki-cloze-qa" in names.dataset_names()


def test_the_cli_module_imports_no_heavy_library():
    probe = (
        "import sys, eexit.cli; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_version_and_help_answer_without_loading_a_model():
    done = subprocess.run(
        [sys.executable, "-m", "eexit.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip().startswith("eexit ")
    done = subprocess.run(
        [sys.executable, "-m", "eexit.cli", "evaluate", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "max-prob" in done.stdout and "wiki-gensim" in done.stdout
