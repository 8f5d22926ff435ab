"""Benchmarks of csvimg: ``python -m bench`` (see bench/README.md)."""
