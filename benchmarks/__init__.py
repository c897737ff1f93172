"""Benchmark scripts (run as `python benchmarks/NAME.py --help`); importable for their tests."""
