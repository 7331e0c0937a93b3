"""Models: the early-exit wrapper (`early_exit`), checkpoint metadata (`checkpoint`), loading and
building (`loading`), the block adapters the decoder uses (`blocks`, one per family in
`families/`) and early-exit decoding (`decoding`). Importing it registers every family."""

from eexit.models import families  # noqa: F401  (registration)
