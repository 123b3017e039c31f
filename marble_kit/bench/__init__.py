"""Benchmarks that a notebook or `marble bench` can run (library functions returning rows)."""
