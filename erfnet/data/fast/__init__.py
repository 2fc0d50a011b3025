"""Opt-in fast data paths: device-side augmentation (--gpu-aug) and the decoded cache (--data-cache)."""
