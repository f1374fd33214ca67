"""Benchmarks: `python -m bench [NAME ...] [--size smoke|real]`, each printing key=value lines."""
