"""Parse threshold lists: `0.5:0.95` (step 0.05), `a:b:s`, or `0.5,0.7,0.9`."""

from __future__ import annotations

from eexit.errors import EexitError

DEFAULT_STEP = 0.05
MAX_THRESHOLDS = 10_001  # a grid of step 1e-4 over [0, 1]
ALLOWED = "a:b (step 0.05), a:b:step, or a comma list, all in [0, 1]"


def _num(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise EexitError(
            f"malformed thresholds {spec!r}: {text!r} is not a number; use {ALLOWED}"
        ) from None


def parse_thresholds(spec: str) -> list[float]:
    spec = spec.strip()
    if not spec:
        raise EexitError(f"empty thresholds; use {ALLOWED}")
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise EexitError(f"malformed thresholds {spec!r}; use {ALLOWED}")
        a, b = _num(parts[0], spec), _num(parts[1], spec)
        step = _num(parts[2], spec) if len(parts) == 3 else DEFAULT_STEP
        if step <= 0:
            raise EexitError(
                f"malformed thresholds {spec!r}: the step must be positive; use {ALLOWED}"
            )
        if b < a:
            raise EexitError(
                f"malformed thresholds {spec!r}: the end is below the start; use {ALLOWED}"
            )
        n = int(round((b - a) / step + 1e-9))
        if n + 1 > MAX_THRESHOLDS:
            raise EexitError(
                f"thresholds {spec!r} make {n + 1} values; at most {MAX_THRESHOLDS} (use a larger "
                "step)"
            )
        values = [round(a + i * step, 10) for i in range(n + 1)]
        if values[-1] < b - 1e-9:
            values.append(b)
    else:
        values = [_num(p, spec) for p in spec.split(",") if p.strip()]
        if not values:
            raise EexitError(f"empty thresholds; use {ALLOWED}")
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise EexitError(f"thresholds must lie in [0, 1]; got {bad[0]} in {spec!r}")
    return values
