"""What the experiment scripts share: the Learn-then-Test threshold grid and the calibration of
one policy on the validation split (classifiers fit on even windows, thresholds on odd ones).

The scripts run as `python experiments/<study>/run.py` from the project root; they put the root
on sys.path to import this module."""

from __future__ import annotations

from eexit.calibration.calibrate import CalibrateOptions, calibrate
from eexit.evaluation.context import EvalRequest, open_context

# fine near 1 (saturation-style scores crowd there): 0.00..0.89 by 0.01, then 0.900..1.000 by 0.001
LTT_GRID = sorted(
    {round(i / 100, 3) for i in range(0, 90)} | {round(0.9 + i / 1000, 3) for i in range(0, 101)},
    reverse=True,
)


def calibrate_policy(
    request: EvalRequest, opts: CalibrateOptions, model=None, tokenizer=None
) -> dict:
    """LTT summary for the request's policy, calibrated on the odd windows of its split (the even
    ones fit the classifiers); `model` / `tokenizer` reuse a loaded model."""
    ctx = open_context(request, model=model, tokenizer=tokenizer)
    summary, _ = calibrate(ctx, opts, slice(1, None, 2))
    return summary
