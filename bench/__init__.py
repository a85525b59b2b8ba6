"""Benchmarks of a dfs mount against a local directory on the same disk (see bench/run.py)."""
