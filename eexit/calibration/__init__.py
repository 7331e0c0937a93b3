"""Calibration: fitting exit classifiers and Learn-then-Test thresholds (`calibrate`) with the
p-values and fixed-sequence testing of `ltt`."""
