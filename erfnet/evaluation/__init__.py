"""Evaluation: test-time inference, the metric loop, mmseg's metrics, reports and palettes."""
