"""Measurement helpers behind scripts/benchmark.py (never imported by the core)."""
