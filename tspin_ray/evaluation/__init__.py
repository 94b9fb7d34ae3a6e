"""Benchmark scores of committed iterates with lm-evaluation-harness (harness.py)."""
