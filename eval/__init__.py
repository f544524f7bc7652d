"""qkit.eval: evaluation harness and benchmarks (entry points that print; the library itself never does)."""
