"""Benchmark suites and reference rows (see BENCHMARK.md)."""
