"""Benchmarks behind `tunnel-lab bench`."""
