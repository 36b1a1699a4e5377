"""Fake vendor clouds for the demo, the tests and the benchmarks (`syncd sim`)."""
