"""`make bench`: the benchmark harness (bench/run.py) and its single-purpose benchmarks."""
