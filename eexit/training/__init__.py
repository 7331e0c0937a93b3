"""Training: the objectives (`losses`, registered on import) and the loop (`loop`, imported
where a run starts: it pulls in accelerate)."""

from eexit.training import losses  # noqa: F401  (registration)
