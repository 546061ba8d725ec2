"""Measuring kvgate: micro-benchmarks of the routing core (and, later, trace replay and load)."""
