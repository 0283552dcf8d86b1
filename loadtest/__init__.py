"""Load-test harness and benchmarks (issue: load-test harness)."""
