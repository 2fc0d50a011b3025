"""Opt-in fast data paths: device augmentation (--gpu-aug) and the decoded cache (--data-cache)."""
