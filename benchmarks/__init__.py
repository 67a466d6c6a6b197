"""Benchmarks for uniopd (not part of the installed package)."""
