"""Bridges to other tools of the field (imported only when used): lm-evaluation-harness."""
