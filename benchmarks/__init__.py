"""Benchmark suite for the chest X-ray workbench: `python -m benchmarks.run [--quick] [--only NAME ...]`.

Not part of the pytest suite. Results go to benchmarks/results/ (git-ignored) and RESULTS.md.
"""
