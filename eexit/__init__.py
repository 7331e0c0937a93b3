"""eexit: an experiment runner for early exiting in transformers."""

__version__ = "0.1.0"


def quiet() -> None:
    """Silence transformers' info logs and progress bars (for the CLI and experiment scripts)."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()  # eexit draws its own progress (stderr, or log lines)
    datasets.logging.set_verbosity_error()
